"""How a structured layer's contraction runs: the one place that talks to opt_einsum.

Two executions exist. The BTT family (β = δ = 1) runs as two batched matmuls in a feature-major layout that
reads the input in place and never copies activations (performance-notes.md). Every other θ runs as two
pairwise einsums whose order (input meets A first, or B first) is chosen once, at construction, by opt_einsum's
cost on the real shapes; weights-first orders are excluded because they rebuild the dense matrix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import opt_einsum
import torch
from torch import Tensor

from .spec import EinsumSpec

__all__ = ["ContractionPlan", "btt_forward", "plan_contraction", "run"]

# Activation-first pairwise orders of "x, A, B" as opt_einsum paths.
_ORDERS = {"xA": [(0, 1), (0, 1)], "xB": [(0, 2), (0, 1)]}


@dataclass(frozen=True)
class ContractionPlan:
    """The chosen execution of one layer: ``kind`` is "dense", "bmm" or "einsum"."""

    kind: str
    order: str
    steps: tuple[str, ...]
    cost: int  # opt_einsum's FLOP count of the chosen order, per token

    def describe(self) -> str:
        """Short text for reports."""
        if self.kind == "einsum":
            return f"einsum {self.order}: " + " ; ".join(self.steps)
        return self.kind


@functools.lru_cache(maxsize=4096)
def plan_contraction(spec: EinsumSpec, tokens: int = 1) -> ContractionPlan:
    """Choose how ``spec`` runs; cached per (spec, tokens)."""
    if spec.is_dense:
        return ContractionPlan("dense", "x@W.T", (spec.equation,), 2 * spec.macs)
    shapes = _operand_shapes(spec, tokens)
    best: tuple[int, str, tuple[str, ...]] | None = None
    for order, path in _ORDERS.items():
        _, info = opt_einsum.contract_path(spec.equation, *shapes, shapes=True, optimize=path)
        steps = _steps_in_operand_order(spec.equation, order, [entry[2] for entry in info.contraction_list])
        cost = int(info.opt_cost) // max(tokens, 1)
        if best is None or cost < best[0]:
            best = (cost, order, steps)
    assert best is not None
    kind = "bmm" if spec.is_btt and best[1] == "xA" else "einsum"
    return ContractionPlan(kind, best[1], best[2], best[0])


def _steps_in_operand_order(equation: str, order: str, steps: list[str]) -> tuple[str, str]:
    """Rewrite opt_einsum's two step strings as "x,first->z" and "z,second->y"."""
    x_term, a_term, b_term = equation.split("->")[0].split(",")
    first, second = (a_term, b_term) if order == "xA" else (b_term, a_term)
    z_term = steps[0].split("->")[1]
    out = equation.split("->")[1]
    return (f"{x_term},{first}->{z_term}", f"{z_term},{second}->{out}")


def _operand_shapes(spec: EinsumSpec, tokens: int) -> list[tuple[int, ...]]:
    a, b, g, _, _, _, _ = spec.sizes
    return [(tokens, g, b, a), spec.core_shapes["A"], spec.core_shapes["B"]]


def run(spec: EinsumSpec, plan: ContractionPlan, x: Tensor, cores: dict[str, Tensor]) -> Tensor:
    """Apply the structured weight to ``x`` of shape (N, d_in); returns (N, d_out), possibly strided."""
    if plan.kind == "dense":
        return x @ cores["weight"].t()  # (N, d_out)
    pad = spec.sizes.in_size - spec.d_in
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))  # (N, in_size): padded features are zeros
    if plan.kind == "bmm":
        y = btt_forward(x, cores["A"], cores["B"], spec)
    else:
        a, b, g, _, _, _, _ = spec.sizes
        xs = x.reshape(x.shape[0], g, b, a)  # (N, γ, β, α)
        first, second = (cores["A"], cores["B"]) if plan.order == "xA" else (cores["B"], cores["A"])
        z = torch.einsum(plan.steps[0], xs, first)  # the input meets one core
        y = torch.einsum(plan.steps[1], z, second).reshape(x.shape[0], spec.sizes.out_size)  # (N, φεδ)
    return y[:, : spec.d_out] if spec.sizes.out_size != spec.d_out else y


def btt_forward(x: Tensor, A: Tensor, B: Tensor, spec: EinsumSpec) -> Tensor:
    """Two batched matmuls in feature-major layout; x: (N, γα) -> (N, φε) as a transposed view.

    Every operand is read in place: BLAS accepts a matrix whose rows or columns have unit stride, so the
    permuted views below cost no copies. The result is the (φ, ε, N) product seen as (N, φε).
    """
    a, _, g, _, e, f, r = spec.sizes
    n = x.shape[0]
    xt = x.reshape(n, g, a).permute(1, 2, 0)  # (γ, α, N) view
    z = torch.bmm(A.reshape(g, r * f, a), xt)  # (γ, ρφ, N)
    zt = z.reshape(g * r, f, n).transpose(0, 1)  # (φ, γρ, N) view
    y = torch.bmm(B.reshape(f, e, g * r), zt)  # (φ, ε, N)
    return y.reshape(f * e, n).t()  # (N, φε) view
