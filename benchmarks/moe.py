"""Speed of BTT-MoE dispatch paths against dense layers (CPU, fp32), side by side in one run.

For each number of experts E (k = 2 active), forward and forward+backward, one interleaved best-of-N run times

* ``moe sparse``: ``BTTMoELinear(dispatch="sparse")``, only the selected experts run (gather, per-expert bmm,
  scatter-add);
* ``moe dense``: ``BTTMoELinear(dispatch="dense")``, every expert on every token, masked (the paper's method);
* ``nn.Linear``: the dense layer of the same width (d -> d);
* ``same-MACs dense``: ``nn.Linear(d, m)`` with d·m equal to the MoE's active MACs per token,

the forward in eval mode without gradients (inference), forward+backward in training mode (the MoE layers
then also compute their aux loss and router statistics),

and prints each time with ``sparse/dense`` (time of dense dispatch ÷ time of sparse dispatch), ``vs Linear``
(time of nn.Linear ÷ time of the row) and the verdicts on the targets of issue 5: sparse ≥ 2.5x faster than
dense dispatch at E = 16 (ideal E/k = 8x) and ≥ 1.5x at E = 8 (ideal 4x). The router is random (not the
zero init, which sends every token to experts 0 and 1), so tokens spread over the experts as after training.

Forward+backward computes the gradients of the input and of every parameter for a fixed output gradient
(``torch.autograd.grad``).

Usage::

    .venv/bin/python benchmarks/moe.py                  # d = 1024, 4096 tokens, E in {8, 16}
    .venv/bin/python benchmarks/moe.py --quick          # small sizes, a smoke test
    .venv/bin/python benchmarks/moe.py --repeats 10 --threads 2

This is a benchmark, not a test: the machine may be shared, so compare ratios taken in the same run. On an
oversubscribed machine (load average above the core count) use ``--threads 1``: the sparse path runs about
4E mid-sized ops, and with two threads each parallel region may wait a scheduler time slice for the second
thread, which the dense path (a handful of large ops) does not notice; its 2-thread ratios then swing 2-3x
from run to run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import best_times, format_seconds  # noqa: E402

from einrewrite import BTTMoELinear  # noqa: E402

TARGETS = {16: 2.5, 8: 1.5}  # E -> required speedup of sparse over dense dispatch (issue 5)


def _forward(module: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return module(x)

    return call


def _forward_backward(module: nn.Module, x: Tensor, grad_out: Tensor) -> Callable[[], object]:
    inputs = [x, *module.parameters()]

    def call() -> object:
        return torch.autograd.grad(module(x), inputs, grad_out)

    return call


def _moe(d: int, experts: int, top_k: int, dispatch: str) -> BTTMoELinear:
    torch.manual_seed(0)
    layer = BTTMoELinear(d, d, num_experts=experts, top_k=top_k, dispatch=dispatch)  # type: ignore[arg-type]
    with torch.no_grad():
        layer.router.weight.normal_(0.0, d**-0.5)  # a trained-looking router: tokens spread over experts
    return layer


def bench(d: int, tokens: int, experts: int, top_k: int, repeats: int, budget_s: float | None) -> list[tuple[str, ...]]:
    """Time the four layers at one E; returns table rows."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    xg = x.clone().requires_grad_(True)
    sparse = _moe(d, experts, top_k, "sparse")
    dense = _moe(d, experts, top_k, "dense")
    dense.load_state_dict(sparse.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)  # same function
    m = max(1, round(sparse.macs / d))
    layers: dict[str, nn.Module] = {
        "moe sparse": sparse,
        "moe dense": dense,
        "nn.Linear": nn.Linear(d, d, bias=False),
        f"same-MACs dense ({d}->{m})": nn.Linear(d, m, bias=False),
    }
    load = torch.bincount(sparse.router(x).topk(top_k).indices.reshape(-1), minlength=experts)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        fns: dict[str, Callable[[], object]] = {}
        for name, layer in layers.items():
            layer.train(mode != "fwd")  # inference forward; training forward+backward (the MoE's aux loss too)
            if mode == "fwd":
                fns[name] = _forward(layer, x)
            else:
                out_features = layer.out_features  # type: ignore[union-attr]
                fns[name] = _forward_backward(layer, xg, torch.randn(tokens, int(out_features)))
        times = best_times(fns, repeats=repeats, budget_s=budget_s)
        for name, t in times.items():
            layer = layers[name]
            macs = getattr(layer, "macs", None) or d * int(layer.out_features)  # type: ignore[union-attr]
            if name == "moe dense":
                macs = experts * sparse.spec.expert_macs + sparse.spec.router_params  # the work actually done
            rows.append((
                str(experts), mode, name, format_seconds(t), f"{times['moe dense'] / t:.2f}",
                f"{times['nn.Linear'] / t:.2f}", f"{macs:,}",
            ))
        ratio = times["moe dense"] / times["moe sparse"]
        target = TARGETS.get(experts)
        verdict = "n/a" if target is None else ("MET" if ratio >= target else "MISSED")
        wanted = f"target >= {target}x" if target else ""
        rows.append((
            str(experts), mode, "=> sparse vs dense dispatch", f"{ratio:.2f}x", wanted, verdict,
            f"ideal {experts / top_k:.0f}x",
        ))
    rows.append((str(experts), "", f"tokens per expert: min {int(load.min())}, max {int(load.max())}", "", "", "", ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse options, time each E and print one table with the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument("--d", type=int, help="layer width (default 1024)")
    parser.add_argument("--tokens", type=int, help="tokens per call (default 4096)")
    parser.add_argument("--experts", type=int, nargs="+", help="numbers of experts (default 8 16)")
    parser.add_argument("--top-k", type=int, default=2, help="active experts per token (default 2)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds; each callable keeps its best (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    d = args.d or (64 if args.quick else 1024)
    tokens = args.tokens or (128 if args.quick else 4096)
    experts = args.experts or [8, 16]
    repeats = args.repeats or (2 if args.quick else 7)
    budget_s = 2.0 if args.quick else None
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, fp32 CPU, {torch.get_num_threads()} threads, d={d}, tokens={tokens}, "
        f"k={args.top_k}, best of {repeats} interleaved rounds; load average {load:.1f} on {os.cpu_count()} cores"
    )
    start = time.perf_counter()
    header = ("E", "mode", "layer", "time", "vs moe dense", "vs Linear", "MACs/token")
    rows: list[tuple[str, ...]] = []
    for e in experts:
        rows.extend(bench(d, tokens, e, args.top_k, repeats, budget_s))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"({time.perf_counter() - start:.1f} s; 'moe dense' MACs are the work it does, E experts per token; the "
        "MoE's counted active MACs are those of 'moe sparse')"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
