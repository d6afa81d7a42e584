"""Rewrite one dense layer of random weights into every registered structure and compare.

For each structure: parameters, MACs per token, the taxonomy (ω, ψ, ν), the relative Frobenius error of the
projection of the dense weight, and the measured forward speed against ``nn.Linear`` (best of N, in one run).

    python examples/structures_demo.py [--d 1024] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from einrewrite import STRUCTURES, EinrewriteError
from einrewrite.tables import format_table

# Hyper-parameters for the demo where a structure's example is too small to be interesting at d = 1024.
DEMO_HYPER: dict[str, dict[str, object]] = {
    "low_rank": {"rank": 32},
    "tensor_train": {"rank": 4},
    "btt": {"rank": 2},
}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024, help="layer width (square layer)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per forward for the timing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dense = nn.Linear(args.d, args.d)
    x = torch.randn(args.tokens, args.d)
    rows = []
    with torch.no_grad():
        dense_time = best_time(lambda: dense(x), args.repeats)
        for name in sorted(STRUCTURES):
            cls = STRUCTURES[name]
            instance = cls(**DEMO_HYPER[name]) if name in DEMO_HYPER else _default(cls)
            try:
                spec = instance.bind(args.d, args.d)
                layer = spec.build(dense.weight, dense.bias, init="project")
            except EinrewriteError as e:
                rows.append((name, f"skipped: {e}", *["-"] * 7))
                continue
            layer_time = best_time(lambda layer=layer: layer(x), args.repeats)
            theta = getattr(spec, "theta", None)
            rows.append(
                (
                    spec.describe().split(" θ=")[0],
                    f"{spec.params:,}",
                    f"{spec.macs:,}",
                    f"{spec.dense_macs / spec.macs:.1f}x",
                    "-" if theta is None else f"{theta.omega:.2f}/{theta.psi:.2f}/{theta.nu:.2f}",
                    f"{getattr(layer, 'projection_error', 0.0) or 0.0:.3f}",
                    f"{layer_time * 1e3:.2f}",
                    f"{dense_time / layer_time:.2f}x",
                )
            )
    print(f"one {args.d}x{args.d} nn.Linear of random weights, {args.tokens} tokens, fp32 CPU, "
          f"{torch.get_num_threads()} threads; nn.Linear forward {dense_time * 1e3:.2f} ms")
    header = ("structure", "params", "MACs/token", "FLOP cut", "ω/ψ/ν", "proj. error", "fwd ms", "vs nn.Linear")
    print(format_table(header, rows))


def _default(cls: type) -> object:
    try:
        return cls()
    except TypeError:
        return cls.example()


if __name__ == "__main__":
    main()
