"""Side-by-side speed of structured layers against nn.Linear and the paper's naive formulation (CPU, fp32).

For every (d, tokens) pair and for forward and forward+backward, one interleaved best-of-N run times
``nn.Linear(d, d)``, ``EinsumLinear`` for each structure, and ``einrewrite.reference.reference_forward``
(two ``torch.einsum`` calls with ``.contiguous()``, paper-notes §6) for the same structure, then prints

* ``vs Linear``: time(nn.Linear) / time(structure), the realized speedup;
* ``vs ref``: time(reference) / time(structure);
* ``FLOP red.``: dense MACs / structured MACs;
* ``realized/red.``: realized speedup ÷ FLOP reduction (1.0 is the ceiling; the peer kernel reaches 0.12-0.31).

Forward+backward computes the gradients of the input and of every parameter for a fixed random output
gradient (``torch.autograd.grad``, so no time goes into accumulating ``.grad``). Structured layers may return
a feature-major (transposed) view; the time of a consumer reading it is not included.

Usage::

    .venv/bin/python benchmarks/layers.py                  # d in {1024, 4096}, tokens in {1024, 4096}
    .venv/bin/python benchmarks/layers.py --quick          # small sizes, a smoke test
    .venv/bin/python benchmarks/layers.py --d 1024 --tokens 4096 --repeats 20

This is a benchmark, not a test: the machine may be shared, so compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import best_times, format_seconds  # noqa: E402

from einrewrite import EinsumLinear, EinsumSpec, structure  # noqa: E402
from einrewrite.reference import paper_cores, reference_forward  # noqa: E402


@dataclass(frozen=True)
class Case:
    """One structure of the table: a label and how to bind it to a (d, d) layer."""

    label: str
    name: str
    hyper: tuple[tuple[str, int], ...] = ()

    def spec(self, d: int) -> EinsumSpec:
        """The bound spec; low_rank's rank is d/32 (16x fewer MACs than dense, as Monarch at d=1024)."""
        hyper = dict(self.hyper)
        if self.name == "low_rank":
            hyper = {"rank": max(1, d // 32)}
        return structure(self.name, d, d, **hyper)


CASES = (
    Case("monarch", "monarch"),
    Case("btt r=1", "btt", (("rank", 1),)),
    Case("btt r=2", "btt", (("rank", 2),)),
    Case("btt r=4", "btt", (("rank", 4),)),
    Case("low_rank r=d/32", "low_rank"),
    Case("kronecker", "kronecker"),
)


def _forward(module: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.no_grad():
            return module(x)

    return call


def _forward_backward(
    module: Callable[[Tensor], Tensor], x: Tensor, params: list[Tensor], grad_out: Tensor
) -> Callable[[], object]:
    inputs = [x, *params]

    def call() -> object:
        return torch.autograd.grad(module(x), inputs, grad_out)

    return call


def bench(d: int, tokens: int, repeats: int, budget_s: float | None) -> list[tuple[str, ...]]:
    """Time every case at one (d, tokens); returns table rows."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    xg = x.clone().requires_grad_(True)
    grad_out = torch.randn(tokens, d)
    linear = nn.Linear(d, d)
    fwd: dict[str, Callable[[], object]] = {"nn.Linear": _forward(linear, x)}
    fwd_bwd: dict[str, Callable[[], object]] = {
        "nn.Linear": _forward_backward(linear, xg, list(linear.parameters()), grad_out)
    }
    specs: dict[str, EinsumSpec] = {}
    for case in CASES:
        spec = case.spec(d)
        specs[case.label] = spec
        layer = EinsumLinear(spec)
        a_core, b_core = (c.detach().requires_grad_(True) for c in paper_cores(layer))

        def reference(
            inp: Tensor, layer: EinsumLinear = layer, cores: tuple[Tensor, Tensor] = (a_core, b_core)
        ) -> Tensor:
            return reference_forward(inp, layer, cores)

        params = list(layer.parameters())
        ref_params = [a_core, b_core, *([layer.bias] if layer.bias is not None else [])]
        fwd[case.label] = _forward(layer, x)
        fwd[f"ref {case.label}"] = _forward(reference, x)
        fwd_bwd[case.label] = _forward_backward(layer, xg, params, grad_out)
        fwd_bwd[f"ref {case.label}"] = _forward_backward(reference, xg, ref_params, grad_out)
    rows = []
    for mode, fns in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        times = best_times(fns, repeats=repeats, budget_s=budget_s)
        base = times["nn.Linear"]
        rows.append((str(d), str(tokens), mode, "nn.Linear", format_seconds(base), "1.00", "", "1.0", ""))
        for case in CASES:
            spec = specs[case.label]
            t, t_ref = times[case.label], times[f"ref {case.label}"]
            speedup = base / t
            reduction = spec.dense_macs / spec.macs
            rows.append((
                str(d), str(tokens), mode, case.label, format_seconds(t), f"{speedup:.2f}", f"{t_ref / t:.2f}",
                f"{reduction:.1f}", f"{speedup / reduction:.2f}",
            ))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse options, run every size and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    parser.add_argument("--d", type=int, nargs="+", help="layer widths (default 1024 4096)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default 1024 4096)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds; each callable keeps its best (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    widths = args.d or ([128] if args.quick else [1024, 4096])
    token_counts = args.tokens or ([128] if args.quick else [1024, 4096])
    repeats = args.repeats or (2 if args.quick else 7)
    budget_s = 2.0 if args.quick else None
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, fp32 CPU, {torch.get_num_threads()} threads, best of {repeats} interleaved "
        "rounds per size and mode"
    )
    start = time.perf_counter()
    header = ("d", "tokens", "mode", "layer", "time", "vs Linear", "vs ref", "FLOP red.", "realized/red.")
    rows: list[tuple[str, ...]] = []
    for d in widths:
        for tokens in token_counts:
            rows.extend(bench(d, tokens, repeats, budget_s))
    widths_col = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths_col, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths_col, strict=True)))
    print(f"({time.perf_counter() - start:.1f} s; low_rank uses rank d/32; btt r=1 has Monarch's sizes here)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
