"""A GPT-shaped model in ONNX Runtime: dense vs its BTT and BTT-MoE rewrites, and structured ORT vs torch eager.

One run builds ``examples/tiny_gpt.py`` at d=1024, 4 blocks, 16 heads, 4·d MLP; rewrites every linear layer
but the tied head to BTT and to BTT-MoE (E=8, k=2) at 1/8 of its dense MACs (``einrewrite.rewrite``; µP
init, since speed does not depend on the weights); exports each model with ``einrewrite.export_onnx`` (ORT
parity checked, node placement recorded) and times, interleaved best-of-N in the same process:

* ``dense ORT``, ``<structure> ORT``: the exported models in ONNX Runtime;
* ``<structure> torch``: the structured model in torch eager (``no_grad``), same thread count;
* optionally ``dense torch`` (``--dense-torch``).

The ORT sessions flush denormal floats to zero (``onnxruntime_session(flush_denormals=True)``, which
:mod:`einrewrite.denormals` explains): the causal mask's ``-inf`` scores otherwise send ORT's CPU ``Softmax`` through
denormals, about 4x slower, in the dense model and the rewrites alike. ``--keep-denormals`` times ORT as a session
made without einrewrite runs.

Each export's line gives its file size and, on CPU, its ORT session's memory: how much a fresh process's
resident memory grows when ONNX Runtime loads it. It prints the best and median times, the ratios ``dense ORT /
structured ORT`` (target >= 3x on CPU, >= 2x on CUDA; the verdict is on the best times, and the same ratio taken
round by round, whose median and range say how steady it was while the machine's load moved) and ``structured
torch / structured ORT`` (target >= 1x), and
with ``--profile`` the ORT time per op type of each model, and how much of it the rewritten layers take: their
own dense / structured ratio, and the ceiling the rest of the model (attention, norms, activations) puts on the
model's ratio, which says where the time goes when a target is missed.

BTT-MoE is timed twice in the same run: ``btt_moe:init`` with the routers the rewrite makes (zero: every
token goes to experts 0..k-1, as in an untrained rewrite) and ``btt_moe:random`` with routers drawn at random,
which spread the load over all experts as a trained router does; ``--router init`` or ``random`` keeps one.
The printed max expert load says how the tokens spread.

``--provider cuda`` runs the same on a GPU: the CUDA execution provider in float16 (nodes left on the CPU are
counted) against torch eager on the GPU in float16. In float16 the BTT-MoE exports' parity is printed but not held
to a tolerance: rounding sends tokens with near-tied router scores to other experts, in PyTorch and in ORT but
not for the same tokens (the d=1024 model with random routers: max |diff| 2.4).

Usage::

    .venv/bin/python benchmarks/onnx.py                 # d=1024, 4 layers, 8x256 = 2048 tokens (minutes)
    .venv/bin/python benchmarks/onnx.py --quick         # d=256, 2 layers, 4x128 tokens: a smoke run
    .venv/bin/python benchmarks/onnx.py --profile --structures btt
    .venv/bin/python benchmarks/onnx.py --structures btt_moe --router random
    .venv/bin/python benchmarks/onnx.py --provider cuda # GPU, float16

This is a benchmark, not a test: the machine may be shared, so compare ratios taken in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named onnx.py: drop its folder from the import path so that ``import onnx`` finds the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import copy
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = _HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import einrewrite as er  # noqa: E402
from einrewrite.bench import round_ratios, time_rounds  # noqa: E402
from einrewrite.export import node_module_scopes, onnxruntime_session  # noqa: E402
from einrewrite.tables import format_table  # noqa: E402
from tiny_gpt import build  # noqa: E402


def linear_macs(model: nn.Module) -> int:
    """MACs per token of the model's linear layers (dense or structured), the tied head excluded."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith(("lm_head", ".router")):  # the tied head; a BTT-MoE router is in its layer's macs
            continue
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif hasattr(module, "macs") and hasattr(module, "in_features"):
            total += int(module.macs)
    return total


def structured_models(
    dense: nn.Module, example: tuple[Tensor, ...], ratio: float, wanted: set[str]
) -> dict[str, nn.Module]:
    """The ``wanted`` rewrites at ``ratio`` of the dense MACs: ``btt``, and ``btt_moe`` when the package has it."""
    budget = er.FlopBudget(ratio=ratio)
    out = {}
    if "btt" in wanted:
        model, _ = er.rewrite(dense, er.RewriteConfig(structure="btt", budget=budget, init="mup"), example)
        out["btt"] = model.eval()
    if "btt_moe" in wanted and hasattr(er, "BTTMoELinear") and "btt_moe" in er.STRUCTURES:
        config = er.RewriteConfig(structure="btt_moe", budget=budget, init="mup")
        try:
            model, _ = er.rewrite(dense, config, example)
        except er.BudgetInfeasibleError as e:  # small layers cannot hold 8 experts at this budget
            print(f"  btt_moe skipped: {e}")
        else:
            out["btt_moe"] = model.eval()
    return out


def spread_routers(model: nn.Module, seed: int = 0) -> None:
    """Draw every BTT-MoE router from N(0, 1/d_in): a stand-in for a trained router that spreads the load.

    A rewrite's router starts at zero, which sends every token to experts 0..k-1 (ties go to the lower index).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, er.BTTMoELinear):
                weight = module.router.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * module.in_features**-0.5)


def max_expert_load(model: nn.Module, idx: Tensor) -> float | None:
    """Largest share of (token, slot) pairs any expert gets, times E (1.0 = balanced, E/k = all on k experts);
    the mean over the model's BTT-MoE layers on ``idx``, None without any."""
    from einrewrite.moe import route

    layers = [m for m in model.modules() if isinstance(m, er.BTTMoELinear)]
    if not layers:
        return None
    ratios: list[float] = []

    def record(layer: er.BTTMoELinear, logits: Tensor) -> None:
        index, _ = route(logits, layer.top_k)  # (N, k) expert ids
        counts = torch.bincount(index.reshape(-1), minlength=layer.num_experts).float()  # (E,) pairs per expert
        ratios.append(float(counts.max() / counts.sum()) * layer.num_experts)

    handles = [layer.router.register_forward_hook(lambda _m, _i, logits, layer=layer: record(layer, logits))
               for layer in layers]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for handle in handles:
            handle.remove()
    return sum(ratios) / len(ratios)


_SESSION_MEMORY = """
import sys, onnxruntime as ort
def resident():
    return int(open("/proc/self/statm").read().split()[1])
before = resident()
options = ort.SessionOptions()
options.intra_op_num_threads = int(sys.argv[2])
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(resident() - before)
"""


def session_memory_mib(path: Path, threads: int) -> float | None:
    """How much a fresh process's resident memory grows when ONNX Runtime (CPU) loads ``path``: the weights as
    ORT holds them, folded constants and pre-packed MatMul operands included. None off Linux or on failure."""
    import subprocess

    if not Path("/proc/self/statm").exists():
        return None
    done = subprocess.run([sys.executable, "-c", _SESSION_MEMORY, str(path), str(threads)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return int(done.stdout.split()[-1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ort_runner(session: Any, idx: Tensor) -> Callable[[], object]:
    """A zero-argument call running ``session`` on the token ids."""
    feeds = {session.get_inputs()[0].name: idx.numpy()}
    return lambda: session.run(None, feeds)


@dataclass
class Profile:
    """ORT kernel time of one model (ms, in the run of median total): per op type, and in the rewritten layers or
    not."""

    by_op: dict[str, float]
    in_layers: float  # the nodes of the layers the rewrite replaces (nn.Linear in the dense model)
    elsewhere: float  # attention, norms, activations, embeddings, the head


def node_layers(path: Path, layers: set[str]) -> dict[str, bool]:
    """Each node of the exported model (those inside an ``If`` too) -> whether it belongs to one of ``layers``,
    read from the module paths the exporter recorded (:func:`einrewrite.export.node_module_scopes`)."""
    import onnx

    scopes = node_module_scopes(onnx.load(str(path), load_external_data=False))
    return {node: any(f"'{layer}'" in text for layer in layers) for node, text in scopes.items()}


def profile_model(
    path: Path, idx: Tensor, threads: int, layers: set[str], runs: int = 3, flush_denormals: bool = True
) -> Profile:
    """The ms spent in each ORT op type, in the run of median total kernel time (the optimized graph ORT really
    runs; an ``If`` counts as its branch's nodes), and in the nodes of ``layers`` (a node ORT fused keeps its first
    node's name; fusions ORT names anew, such as BiasGelu, which takes a layer's bias, count elsewhere).
    ``flush_denormals`` as in :func:`einrewrite.export.onnxruntime_session`."""
    session = onnxruntime_session(path, "cpu", threads=threads, flush_denormals=flush_denormals,
                                  profile_prefix=str(path.with_suffix("")))
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
    inside = node_layers(path, layers)
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs_at))
    by_part = {True: [0.0] * len(runs_at), False: [0.0] * len(runs_at)}  # in the layers or not
    for event in events:
        op = event.get("args", {}).get("op_name", "?")
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or op == "If":
            continue
        node = event["name"][: -len("_kernel_time")].split("/")[0]  # a fused node: the name before the fusion's
        for i, (begin, end) in enumerate(runs_at):
            if begin <= event["ts"] <= end:
                by_op[op][i] += event["dur"] / 1e3
                by_part[inside.get(node, False)][i] += event["dur"] / 1e3
    # one run's figures, the run of median total: medians taken per op or per part would not add up to one total
    totals = [by_part[True][i] + by_part[False][i] for i in range(len(runs_at))]
    median_run = int(np.argsort(totals)[len(totals) // 2])
    return Profile(
        by_op={op: v[median_run] for op, v in by_op.items()},
        in_layers=by_part[True][median_run],
        elsewhere=by_part[False][median_run],
    )


def rewritten_layers(model: nn.Module) -> set[str]:
    """The names of the structured layers in ``model``: the layers the rewrite replaced."""
    return {name for name, m in model.named_modules() if isinstance(m, (er.EinsumLinear, er.BTTMoELinear))}


def layer_share_lines(profiles: dict[str, Profile]) -> str:
    """Where each model's ORT time goes, the rewritten layers or the rest, and the dense / structured ratio the
    model could reach if its layers took no time: the ceiling the rest of the model puts on the >=3x target."""
    dense = profiles["dense"]
    head = "\nORT kernel time in the rewritten layers | elsewhere:"
    lines = [f"{head} dense {dense.in_layers:.1f} | {dense.elsewhere:.1f} ms"]
    for name, p in profiles.items():
        if name == "dense":
            continue
        layers = dense.in_layers / p.in_layers if p.in_layers else math.inf
        ceiling = (dense.in_layers + dense.elsewhere) / p.elsewhere if p.elsewhere else math.inf
        lines.append(
            f"  {name:14s} {p.in_layers:.1f} | {p.elsewhere:.1f} ms: dense layers / these {layers:.2f}x; "
            f"were these free, dense / this model at most {ceiling:.2f}x"
        )
    return "\n".join(lines)


def _torch_runner(model: nn.Module, idx: Tensor, device: torch.device) -> Callable[[], object]:
    """A zero-argument call of ``model`` on ``idx`` without gradients, synchronised on a GPU."""

    def call() -> object:
        with torch.no_grad():
            out = model(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d=256, 2 layers, 4x128 tokens, 3 repeats")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.125, help="MACs of each rewritten layer / dense")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; --quick 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                        help="ORT execution provider; cuda also runs torch on the GPU (default dtype float16)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default=None,
                        help="precision of every contender (default float32 on cpu, float16 on cuda)")
    parser.add_argument("--structures", default="btt,btt_moe", help="comma-separated: btt, btt_moe")
    parser.add_argument("--router", default="init,random",
                        help="comma-separated BTT-MoE routers, one model each: init (as the rewrite leaves them, "
                             "zero: all tokens on experts 0..k-1), random (the load spread over every expert)")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset of every export (default: the exporter's, 20; 23 has an Attention op)")
    parser.add_argument("--dense-torch", action="store_true", help="also time the dense model in torch eager")
    parser.add_argument("--profile", action="store_true", help="ORT time per op type of each model (cpu)")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="ORT keeps denormal floats (its default), as a session made without einrewrite does")
    args = parser.parse_args(argv)
    if args.quick:
        args.d, args.layers, args.heads, args.batch, args.seq = 256, 2, 4, 4, 128
        args.repeats = args.repeats or 3
    args.repeats = args.repeats or 5
    dtype = args.dtype or ("float16" if args.provider == "cuda" else "float32")
    device = torch.device("cuda" if args.provider == "cuda" else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--provider cuda: torch has no CUDA device here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    start = time.perf_counter()
    dense, example = build(n_embd=args.d, n_layer=args.layers, n_head=args.heads, block_size=args.seq)
    wanted = {s.strip() for s in args.structures.split(",") if s.strip()}
    routers = [r.strip() for r in args.router.split(",") if r.strip()]
    if not routers or set(routers) - {"init", "random"}:
        parser.error(f"--router takes init and/or random, got {args.router!r}")
    models = {"dense": dense}
    for name, model in structured_models(dense, example, args.ratio, wanted).items():
        if name != "btt_moe":
            models[name] = model
            continue
        for router in routers:  # one model per router setting, timed in the same run
            variant = copy.deepcopy(model) if router != routers[-1] else model
            if router == "random":
                spread_routers(variant)
            models[f"btt_moe:{router}"] = variant
    idx = torch.randint(0, dense.wte.num_embeddings, (args.batch, args.seq))
    tokens = args.batch * args.seq
    print(
        f"GPT d={args.d}, {args.layers} layers, {args.heads} heads, MLP 4d, tokens {tokens} "
        f"({args.batch}x{args.seq}), {dtype}, {args.threads} threads; ORT {args.provider.upper()}"
        f"{'' if args.opset is None else f', opset {args.opset}'}, denormals "
        f"{'kept' if args.keep_denormals else 'flushed'}, torch {torch.__version__} on {device.type}"
    )
    for name, model in models.items():
        macs = linear_macs(model)
        load = max_expert_load(model, idx[:1])
        print(f"  {name:14s} linear MACs/token {macs:>12,} ({macs / linear_macs(dense):.3f} of dense)"
              + ("" if load is None else f"; max expert load {load:.2f}x balanced"))

    fns: dict[str, Callable[[], object]] = {}
    paths: dict[str, Path] = {}
    export_idx = idx[:2, : args.seq // 2].clone()  # another shape than the timed one: the axes are dynamic
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            # float16 rounds near-tied BTT-MoE router scores to other experts, in PyTorch and in ORT alike but not
            # for the same tokens: the parity is measured and printed, not held to a tolerance that would stop the run
            flips = dtype == "float16" and any(isinstance(m, er.BTTMoELinear) for m in model.modules())
            report = er.export_onnx(model, (export_idx,), path, dtype=dtype, providers=args.provider,
                                    opset=args.opset, atol=math.inf if flips else None)
            placed = ", ".join(f"{k.replace('ExecutionProvider', '')} {v}" for k, v in report.placement.items())
            size = sum(f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.exists())
            paths[name] = path
            held = session_memory_mib(path, args.threads) if args.provider == "cpu" else None
            session = onnxruntime_session(path, args.provider, threads=args.threads, stop_spinning=True,
                                          flush_denormals=not args.keep_denormals)
            print(f"  {name:14s} exported in {sum(report.seconds.values()):.0f} s: "
                  f"{sum(report.op_counts.values())} nodes"
                  + (f" ({len(report.handoffs)} layers handed off feature-major)" if report.handoffs else "")
                  + f", {size / 2**20:.1f} MiB"
                  + ("" if held is None else f", ORT session {held:.0f} MiB") + ", "
                  f"ORT parity {report.max_abs_diff:.2g}{' (float16 routing, no tolerance)' if flips else ''}; "
                  f"nodes per provider: {placed or 'n/a'}"
                  + (f"; CPU fallback: {len(report.fallback_nodes)}" if report.fallback_nodes else ""))
            fns[f"{name} ORT"] = ort_runner(session, idx)
            if name != "dense" or args.dense_torch:
                runner = copy.deepcopy(model).to(device, torch_dtype) if device.type == "cuda" else model
                fns[f"{name} torch"] = _torch_runner(runner, idx.to(device), device)
        print(f"  setup {time.perf_counter() - start:.0f} s; timing {args.repeats} interleaved rounds")
        rounds = time_rounds(fns, repeats=args.repeats)
        best = {k: min(v) * 1e3 for k, v in rounds.items()}
        profiles = {}
        if args.profile and args.provider == "cpu":
            layers = set().union(*(rewritten_layers(m) for m in models.values()))
            profiles = {name: profile_model(path, idx, args.threads, layers, flush_denormals=not args.keep_denormals)
                        for name, path in paths.items()}

    print()
    print(format_table(["contender", "best ms", "median ms"],
                       [[k, f"{v:.1f}", f"{np.median(rounds[k]) * 1e3:.1f}"] for k, v in best.items()]))
    print()
    target = 2.0 if args.provider == "cuda" else 3.0
    rows = []
    for name in models:
        if name == "dense":
            continue
        vs_dense = best["dense ORT"] / best[f"{name} ORT"]
        vs_torch = best[f"{name} torch"] / best[f"{name} ORT"]
        paired = round_ratios(rounds, "dense ORT", f"{name} ORT")
        rows.append([
            name,
            f"{linear_macs(dense) / linear_macs(models[name]):.1f}x",
            f"{vs_dense:.2f}x",
            "met" if vs_dense >= target else "MISSED",
            f"{np.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f})",
            f"{vs_torch:.2f}x",
            "met" if vs_torch >= 1 else "MISSED",
        ])
    header = ["structure", "MAC red.", "dense ORT / struct ORT", f">={target:g}x", "per round: median (range)",
              "struct torch / struct ORT", ">=1x"]
    print(format_table(header, rows))
    if "dense torch" in best:
        print(f"dense torch / dense ORT: {best['dense torch'] / best['dense ORT']:.2f}x")
    for name, profile in profiles.items():
        total = sum(profile.by_op.values())
        top = sorted(profile.by_op.items(), key=lambda kv: -kv[1])[:8]
        print(f"\nORT profile {name} (the median of 3 runs, {total:.1f} ms in kernels): "
              + ", ".join(f"{op} {ms:.1f} ({ms / total:.0%})" for op, ms in top))
    if "dense" in profiles:
        print(layer_share_lines(profiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
