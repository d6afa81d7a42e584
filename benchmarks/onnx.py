"""A GPT-shaped model in ONNX Runtime (CPU): dense vs its BTT rewrite, and structured ORT vs structured torch eager.

One run builds ``examples/tiny_gpt.py`` at d=1024, 4 blocks, 16 heads, 4·d MLP; rewrites every linear layer
but the tied head to BTT at 1/8 of its dense MACs (``einrewrite.rewrite``; µP init, since speed does not depend
on the weights) and, when ``einrewrite.BTTMoELinear`` exists, to BTT-MoE (E=8, k=2); exports each model with
``einrewrite.export_onnx`` (ORT parity checked) and times, interleaved best-of-N in the same process:

* ``dense ORT``, ``<structure> ORT``: the exported models in ONNX Runtime, CPU provider;
* ``<structure> torch``: the structured model in torch eager (``no_grad``), same thread count;
* optionally ``dense torch`` (``--dense-torch``).

It prints the times, the ratios ``dense ORT / structured ORT`` (target >= 3x) and ``structured torch /
structured ORT`` (target >= 1x), and with ``--profile`` the ORT time per op type of each model, which says
where the time goes when a target is missed.

Usage::

    .venv/bin/python benchmarks/onnx.py                 # d=1024, 4 layers, 8x256 = 2048 tokens (a few minutes)
    .venv/bin/python benchmarks/onnx.py --quick         # d=256, 2 layers, 4x128 tokens: a smoke run
    .venv/bin/python benchmarks/onnx.py --profile --repeats 3

This is a benchmark, not a test: the machine may be shared, so compare ratios taken in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py: drop its folder from the import path so that ``import onnx`` finds the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = _HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import einrewrite as er  # noqa: E402
from einrewrite.bench import time_interleaved  # noqa: E402
from einrewrite.export import onnxruntime_session  # noqa: E402
from einrewrite.tables import format_table  # noqa: E402
from tiny_gpt import build  # noqa: E402


def linear_macs(model: nn.Module) -> int:
    """MACs per token of the model's linear layers (dense or structured), the tied head excluded."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif hasattr(module, "macs") and hasattr(module, "in_features"):
            total += int(module.macs)
    return total


def structured_models(dense: nn.Module, example: tuple[Tensor, ...], ratio: float) -> dict[str, nn.Module]:
    """The BTT rewrite at ``ratio`` of the dense MACs, and the BTT-MoE one when the package has it."""
    budget = er.FlopBudget(ratio=ratio)
    out = {}
    model, _ = er.rewrite(dense, er.RewriteConfig(structure="btt", budget=budget, init="mup"), example)
    out["btt"] = model.eval()
    if hasattr(er, "BTTMoELinear") and "btt_moe" in er.STRUCTURES:
        config = er.RewriteConfig(structure="btt_moe", budget=budget, init="mup")
        model, _ = er.rewrite(dense, config, example)
        out["btt_moe"] = model.eval()
    return out


def _no_grad_call(model: nn.Module, idx: Tensor) -> Tensor:
    with torch.no_grad():
        return model(idx)


def ort_runner(session: Any, idx: Tensor) -> Callable[[], object]:
    """A zero-argument call running ``session`` on the token ids."""
    feeds = {session.get_inputs()[0].name: idx.numpy()}
    return lambda: session.run(None, feeds)


def profile_by_op(path: Path, idx: Tensor, threads: int, runs: int = 3) -> dict[str, float]:
    """Median ms per run spent in each ORT op type (the optimized graph ORT really runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: idx.numpy()}
    session.run(None, feeds)  # warm-up, not counted below
    for _ in range(runs):
        session.run(None, feeds)
    trace = session.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    runs_at = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[1:]  # the warm-up run is not counted
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs_at))
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        for i, (begin, end) in enumerate(runs_at):
            if begin <= event["ts"] <= end:
                per_run[event["args"].get("op_name", "?")][i] += event["dur"] / 1e3
    return {op: float(np.median(v)) for op, v in per_run.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d=256, 2 layers, 4x128 tokens, 3 repeats")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.125, help="MACs of each rewritten layer / dense")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-torch", action="store_true", help="also time the dense model in torch eager")
    parser.add_argument("--profile", action="store_true", help="ORT time per op type of each model")
    args = parser.parse_args(argv)
    if args.quick:
        args.d, args.layers, args.heads, args.batch, args.seq, args.repeats = 256, 2, 4, 4, 128, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    dense, example = build(n_embd=args.d, n_layer=args.layers, n_head=args.heads, block_size=args.seq)
    models = {"dense": dense, **structured_models(dense, example, args.ratio)}
    idx = torch.randint(0, dense.wte.num_embeddings, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(
        f"GPT d={args.d}, {args.layers} layers, {args.heads} heads, MLP 4d, tokens {tokens} "
        f"({args.batch}x{args.seq}), fp32, {args.threads} threads; ORT CPU, torch {torch.__version__}"
    )
    for name, model in models.items():
        macs = linear_macs(model)
        print(f"  {name:8s} linear MACs/token {macs:>12,} ({macs / linear_macs(dense):.3f} of dense)")

    fns: dict[str, Callable[[], object]] = {}
    paths: dict[str, Path] = {}
    export_idx = idx[:2, : args.seq // 2].clone()  # another shape than the timed one: the axes are dynamic
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            report = er.export_onnx(model, (export_idx,), path)
            print(f"  {name:8s} exported: {sum(report.op_counts.values())} nodes, ORT parity {report.max_abs_diff:.2g}")
            paths[name] = path
            fns[f"{name} ORT"] = ort_runner(onnxruntime_session(path, "cpu", threads=args.threads), idx)
            if name != "dense" or args.dense_torch:
                fns[f"{name} torch"] = lambda model=model: _no_grad_call(model, idx)
        print(f"  setup {time.perf_counter() - start:.0f} s; timing {args.repeats} interleaved rounds")
        best = {k: v * 1e3 for k, v in time_interleaved(fns, repeats=args.repeats).items()}
        profiles = {name: profile_by_op(path, idx, args.threads) for name, path in paths.items()} if args.profile else {}

    print()
    print(format_table(["contender", "best ms"], [[k, f"{v:.1f}"] for k, v in best.items()]))
    print()
    rows = []
    for name in models:
        if name == "dense":
            continue
        vs_dense = best["dense ORT"] / best[f"{name} ORT"]
        vs_torch = best[f"{name} torch"] / best[f"{name} ORT"]
        rows.append([
            name,
            f"{linear_macs(dense) / linear_macs(models[name]):.1f}x",
            f"{vs_dense:.2f}x",
            "met" if vs_dense >= 3 else "MISSED",
            f"{vs_torch:.2f}x",
            "met" if vs_torch >= 1 else "MISSED",
        ])
    header = ["structure", "MAC red.", "dense ORT / struct ORT", ">=3x", "struct torch / struct ORT", ">=1x"]
    print(format_table(header, rows))
    if "dense torch" in best:
        print(f"dense torch / dense ORT: {best['dense torch'] / best['dense ORT']:.2f}x")
    for name, ops in profiles.items():
        total = sum(ops.values())
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
        print(f"\nORT profile {name} (median of 3 runs, {total:.1f} ms in kernels): "
              + ", ".join(f"{op} {ms:.1f} ({ms / total:.0%})" for op, ms in top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
