"""The 7-axis θ space of arXiv 2410.02117 and its taxonomy (paper-notes §1-2).

A dense layer ``y = W x`` (``W``: ``(d_out, d_in)``) is replaced by two factors A, B and seven axes::

    W[(φ, ε, δ), (γ, β, α)] = Σ_ρ A[γ, ρ, φ, δ, α] · B[φ, ε, γ, ρ, β]

Letters (used in every equation of the package): ``a`` = α, input axis read only by A; ``b`` = β, input axis
read only by B (A is shared across it); ``g`` = γ, input axis seen by both (block axis of A); ``d`` = δ,
output axis written only by A (B is shared across it); ``e`` = ε, output axis written only by B; ``f`` = φ,
output axis seen by both (block axis of B); ``r`` = ρ, the bond/rank axis between A and B.

θ = (θα, θβ, θγ, θδ, θε, θφ, θρ) ∈ [0, 1]^7 sets the sizes ``d_i ≈ D^θi`` with D = d_in for α, β, γ,
D = d_out for δ, ε, φ and D = min(d_in, d_out) for ρ.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

from .errors import InvalidThetaError

__all__ = ["SUM_TOLERANCE", "Theta", "canonical_neighbour", "parse_theta", "validate_theta"]

SUM_TOLERANCE = 1e-2
_AXES = ("α", "β", "γ", "δ", "ε", "φ", "ρ")


class Theta(NamedTuple):
    """A point of the einsum structure space."""

    alpha: float
    beta: float
    gamma: float
    delta: float
    epsilon: float
    phi: float
    rho: float

    def __str__(self) -> str:
        return "(" + "|".join(_fmt(v) for v in self) + ")"

    @property
    def is_dense(self) -> bool:
        """θγ = θφ = 1: one block over the whole layer, the dense matrix."""
        return self.gamma >= 1 - SUM_TOLERANCE and self.phi >= 1 - SUM_TOLERANCE

    @property
    def omega(self) -> float:
        """Parameter sharing: log_d(FLOPs / params). 0 means every parameter is used once per token."""
        if self.is_dense:
            return 0.0
        a, b, _, d, e, _, _ = self
        return min(a + d, b + e) - min(a, e)

    @property
    def psi(self) -> float:
        """Rank exponent: rank(W) = Θ(d^ψ)."""
        if self.is_dense:
            return 1.0
        return min(1.0, 2.0 + self.rho - self.alpha - self.epsilon)

    @property
    def nu(self) -> float:
        """Compute intensity: FLOPs per token = Θ(d^(1+ν))."""
        if self.is_dense:
            return 1.0
        return 1.0 + self.rho - min(self.alpha, self.epsilon)


def _fmt(v: float) -> str:
    text = f"{v:.3g}"
    return text[1:] if text.startswith("0.") else text


_TEXT = re.compile(r"^\s*\(?\s*([^()]*?)\s*\)?\s*$")


def parse_theta(value: str | Sequence[float]) -> Theta:
    """Read θ from its text form ``"(.5|0|.5|0|.5|.5|0)"`` or from a sequence of 7 numbers.

    Examples:
        >>> parse_theta("(.5|0|.5|0|.5|.5|0)").alpha
        0.5
    """
    if isinstance(value, str):
        match = _TEXT.match(value)
        parts = match.group(1).replace(",", "|").split("|") if match else []
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise InvalidThetaError(
                f"θ {value!r} is not of the form '(α|β|γ|δ|ε|φ|ρ)' with 7 numbers, e.g. '(.5|0|.5|0|.5|.5|0)'"
            ) from None
    else:
        numbers = [float(v) for v in value]
    if len(numbers) != 7:
        raise InvalidThetaError(
            f"θ {value!r} has {len(numbers)} entries; it needs 7 (α|β|γ|δ|ε|φ|ρ), e.g. '(.5|0|.5|0|.5|.5|0)'"
        )
    return Theta(*numbers)


def canonical_neighbour(theta: Theta) -> Theta:
    """The nearest valid θ: clip to [0, 1], renormalise each side, swap A/B roles if redundant, cap ρ."""
    clipped = [min(1.0, max(0.0, v)) if math.isfinite(v) else 0.0 for v in theta]
    a, b, g, d, e, f, r = clipped
    a, b, g = _normalise((a, b, g))
    d, e, f = _normalise((d, e, f))
    if min(a, e) < min(b, d):  # A and B have swapped roles: exchange them
        a, b, d, e = b, a, e, d
    r = min(r, min(a, e))
    return Theta(*(round(v, 4) for v in (a, b, g, d, e, f, r)))


def _normalise(side: tuple[float, float, float]) -> tuple[float, float, float]:
    total = sum(side)
    if total <= 0:
        return (0.0, 0.0, 1.0)
    return (side[0] / total, side[1] / total, side[2] / total)


def validate_theta(theta: Theta) -> Theta:
    """Check θ against the rules of the space and return it, or raise :class:`InvalidThetaError`.

    The rules: finite values in [0, 1]; α+β+γ = 1 and δ+ε+φ = 1 within 1e-2; and the canonical region
    θρ ≤ min(θα, θε) (a larger bond is degenerate) and min(θα, θε) ≥ min(θβ, θδ) (otherwise A and B have
    swapped roles and the taxonomy misreports the rank).
    """
    broken = _broken_rule(theta)
    if broken is None:
        return theta
    raise InvalidThetaError(f"θ {theta} {broken}; a valid neighbour is {canonical_neighbour(theta)}")


def _broken_rule(theta: Theta) -> str | None:
    for name, v in zip(_AXES, theta, strict=True):
        if not math.isfinite(v):
            return f"has a non-finite θ{name} = {v}; every entry must be a finite number in [0, 1]"
        if not 0.0 <= v <= 1.0:
            return f"has θ{name} = {v} outside [0, 1]; every entry must lie in [0, 1]"
    a, b, g, d, e, f, r = theta
    if abs(a + b + g - 1) > SUM_TOLERANCE:
        return f"has α+β+γ = {a + b + g:.4g}; the input axes must sum to 1 (within {SUM_TOLERANCE})"
    if abs(d + e + f - 1) > SUM_TOLERANCE:
        return f"has δ+ε+φ = {d + e + f:.4g}; the output axes must sum to 1 (within {SUM_TOLERANCE})"
    if theta.is_dense:
        return None
    if r > min(a, e) + 1e-9:
        return (
            f"has θρ = {_fmt(r)} > min(θα, θε) = {_fmt(min(a, e))}, outside the canonical region "
            "(a bond larger than both private axes is degenerate)"
        )
    if min(a, e) + 1e-9 < min(b, d):
        return (
            f"has min(θα, θε) = {_fmt(min(a, e))} < min(θβ, θδ) = {_fmt(min(b, d))}, outside the canonical "
            "region (A and B have swapped roles; exchange α↔β and δ↔ε)"
        )
    return None
