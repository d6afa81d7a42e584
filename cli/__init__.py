"""The `einrewrite` command line: a thin layer over the Python API (installed as ``einrewrite.cli``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import click

from einrewrite import STRUCTURES, EinrewriteError, __version__

from .commands import inspect_command, rewrite_command
from .export import bench_command, export_command
from .search import search_command
from .table import format_table

__all__ = ["main"]


class _Group(click.Group):
    """Turns an EinrewriteError into a one-line message and exit 1; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EinrewriteError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(" ".join(str(e).split("\n"))) from e


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="einrewrite")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Rewrite the dense linear layers of a PyTorch model into structured einsum layers."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if verbose or debug:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")


@main.command("structures")
@click.option("--d-in", type=click.IntRange(min=1), default=1024, show_default=True, help="Layer input size.")
@click.option("--d-out", type=click.IntRange(min=1), default=1024, show_default=True, help="Layer output size.")
def structures_command(d_in: int, d_out: int) -> None:
    """Print the structure registry: θ, taxonomy (ω, ψ, ν), params and MACs for a D_IN -> D_OUT layer."""
    rows: list[Sequence[Any]] = []
    for name in sorted(STRUCTURES):
        try:
            spec = STRUCTURES[name].example().bind(d_in, d_out)
        except EinrewriteError as e:
            rows.append((name, "-", "-", "-", "-", "-", "-", "-", f"n/a: {e}"))
            continue
        hyper = ", ".join(f"{k}={v}" for k, v in spec.hyper if k != "theta") or "-"
        rows.append(
            (
                name,
                hyper,
                str(spec.theta),
                f"{spec.omega:.2f}",
                f"{spec.psi:.2f}",
                f"{spec.nu:.2f}",
                f"{spec.params:,}",
                f"{spec.macs:,}",
                f"{spec.macs / spec.dense_macs:.1%}",
            )
        )
    header = ("name", "hyper", "θ (α|β|γ|δ|ε|φ|ρ)", "ω", "ψ", "ν", "params", "MACs/token", "MACs vs dense")
    click.echo(f"structures for a {d_in} -> {d_out} layer (each at its example hyper-parameters)")
    click.echo(format_table(header, rows))


main.add_command(inspect_command)
main.add_command(rewrite_command)
main.add_command(export_command)
main.add_command(bench_command)
main.add_command(search_command)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
