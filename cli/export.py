"""`einrewrite export` and `einrewrite bench`: an einrewrite output directory to ONNX, and its speed side by side."""

from __future__ import annotations

import json
from typing import Any

import click

from einrewrite.bench import bench_saved, format_rows, slower_than_dense
from einrewrite.export import OPTIMIZE_MAX_NODES, export_saved

__all__ = ["bench_command", "export_command"]

_DIR = click.Path(exists=True, file_okay=False)
_DTYPE = click.Choice(["float32", "float16"])
_PROVIDER = click.Choice(["cpu", "cuda"])
_atol_option = click.option(
    "--atol", type=click.FloatRange(min=0), default=None,
    help="Absolute tolerance of the parity check [default: 1e-4 for float32, 2e-2 for float16].",
)
_opset_option = click.option(
    "--opset", type=click.IntRange(min=18), default=None,
    help="ONNX opset [default: the torch exporter's, 20]; 23 exports attention as one Attention node.",
)


def _echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, default=str))


def _parse_tokens(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """``"1,512,2048"`` -> (1, 512, 2048); anything else is a usage error (exit 2)."""
    message = f"expected comma-separated positive integers such as 1,512,2048, got {value!r}"
    try:
        tokens = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(message) from None
    if not tokens or min(tokens) < 1:
        raise click.BadParameter(message)
    return tokens


@click.command("export")
@click.argument("model_dir", metavar="DIR", type=_DIR)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write (weights may also go to OUTPUT.data).")
@click.option("--dtype", type=_DTYPE, default="float32", show_default=True, help="Precision of the exported model.")
@click.option("--provider", type=_PROVIDER, default="cpu", show_default=True,
              help="ONNX Runtime execution provider of the parity check.")
@click.option("--no-check", is_flag=True, help="Skip running the model in ONNX Runtime against PyTorch.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--moe-grouping", type=click.Choice(["auto", "set", "expert"]), default="auto", show_default=True,
              help="BTT-MoE token groups: by expert set (wide layers, many tokens) or by expert (narrow layers, "
                   "decoding); auto picks per layer by width and, on wide layers, by token count when the model "
                   "runs.")
@click.option("--optimize/--no-optimize", default=None,
              help="Run the exporter's full ONNX graph optimizer, or none of it [default: full on graphs of at "
                   f"most {OPTIMIZE_MAX_NODES} nodes, only constant folding on larger ones, where it is slow].")
@_atol_option
@_opset_option
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export_command(model_dir: str, output: str, dtype: str, provider: str, no_check: bool, force: bool,
                   moe_grouping: str, optimize: bool | None, atol: float | None, opset: int | None,
                   as_json: bool) -> None:
    """Export the rewritten model in DIR (an einrewrite output directory) to ONNX and check it in ONNX Runtime.

    Structured layers lower to MatMul chains (no Einsum node); batch and sequence length stay dynamic.
    """
    report = export_saved(model_dir, output, dtype=dtype,  # type: ignore[arg-type]
                          providers=provider, check=not no_check, overwrite=force,
                          moe_grouping=moe_grouping, optimize=optimize, atol=atol,  # type: ignore[arg-type]
                          opset=opset)
    if as_json:
        _echo_json(report.to_dict())
    else:
        click.echo(report.summary())


@click.command("bench")
@click.argument("model_dir", metavar="DIR", type=_DIR)
@click.option("--tokens", default="1,512,2048", show_default=True, callback=_parse_tokens,
              help="Comma-separated token counts (batch x sequence, sequences capped at the model's maximum).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved timing rounds per token count (best kept).")
@click.option("--dtype", type=_DTYPE, default="float32", show_default=True, help="Precision of the ONNX models.")
@click.option("--provider", type=_PROVIDER, default="cpu", show_default=True,
              help="ONNX Runtime execution provider (cuda: the torch models run on the GPU too).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads (default: torch's).")
@click.option("--no-compile", is_flag=True, help="Skip torch.compile of the rewrite.")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX Runtime contenders.")
@click.option("--keep-denormals", is_flag=True,
              help="ONNX Runtime keeps denormal floats (its default; slower masked softmax on the CPU).")
@_atol_option
@_opset_option
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def bench_command(model_dir: str, tokens: tuple[int, ...], repeats: int, dtype: str, provider: str,
                  threads: int | None, no_compile: bool, no_onnx: bool, keep_denormals: bool, atol: float | None,
                  opset: int | None, as_json: bool) -> None:
    """Time the dense base model and the rewrite in DIR side by side, in one run.

    Contenders: dense torch, structured torch eager, structured torch.compile, dense ONNX Runtime and structured
    ONNX Runtime; then the speedups. Timing is interleaved (best of --repeats rounds), so compare ratios. ONNX
    Runtime flushes denormal floats to zero unless --keep-denormals.
    """
    rows = bench_saved(model_dir, tokens=tokens, repeats=repeats, providers=provider, dtype=dtype,
                       compile=not no_compile, onnx=not no_onnx, threads=threads, atol=atol, opset=opset,
                       flush_denormals=not keep_denormals)
    if as_json:
        _echo_json({"type": "BenchResult", "version": 1, "data": {
            "dir": model_dir, "provider": provider, "dtype": dtype, "denormals_flushed": not keep_denormals,
            "rows": [r.to_dict() for r in rows]}})
    else:
        denormals = "kept" if keep_denormals else "flushed"
        click.echo(f"{model_dir}: dense base vs rewrite ({provider}, {dtype}, ORT denormals {denormals}; "
                   f"best of {repeats} interleaved rounds)")
        click.echo(format_rows(rows))
        for line in slower_than_dense(rows):
            click.echo(line)
