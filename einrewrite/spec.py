"""`EinsumSpec`: a θ bound to a layer's (d_in, d_out), with integer axis sizes and every derived count.

The spec is the plan of a structured layer: parameter shapes, the contraction equation, parameter and MAC
counts, the taxonomy and the rank bound all derive from it, never from the structure's name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .errors import InvalidThetaError, PaddingError, StructureMismatchError
from .theta import Theta, parse_theta, validate_theta

__all__ = ["DEFAULT_PAD_TOLERANCE", "EinsumSpec", "Sizes", "factorize"]

DEFAULT_PAD_TOLERANCE = 0.15
# An exact factorization is preferred to a padded one when every factor is within this ratio of its target
# size D^θ (768 = 24·32 against 27.7·27.7; 8 = 2·4 against 2.8·2.8).
_EXACT_PREFERENCE = 1.5

# x: (N, γ, β, α); A: (γ, ρ, φ, δ, α); B: (φ, ε, γ, ρ, β); y: (N, φ, ε, δ). Letters as in theta.py.
EQUATION = "ngba,grfda,fegrb->nfed"
DENSE_EQUATION = "ni,oi->no"


class Sizes(NamedTuple):
    """Integer sizes of the seven axes."""

    alpha: int
    beta: int
    gamma: int
    delta: int
    epsilon: int
    phi: int
    rho: int

    @property
    def in_size(self) -> int:
        """Input size of the operator (≥ d_in; the input is zero-padded up to it)."""
        return self.alpha * self.beta * self.gamma

    @property
    def out_size(self) -> int:
        """Output size of the operator (≥ d_out; the output is cropped down from it)."""
        return self.delta * self.epsilon * self.phi


def factorize(d: int, thetas: Sequence[float], *, what: str = "d") -> tuple[int, ...]:
    """Split ``d`` into integer factors of sizes ``≈ d^θ`` whose product is at least ``d``.

    An exact factorization (product == d) is preferred when every factor is within 1.5x of its target
    size d^θ (768 = 24·32 for θ = (.5, .5)); otherwise the factorization with the least padding plus distance
    to the targets is taken (769 → 28·28 = 784). Axes with θ = 0 get size 1.

    Examples:
        >>> factorize(768, (0.5, 0.5))
        (24, 32)
        >>> factorize(3072, (0.5, 0.5))
        (48, 64)
    """
    if d < 1:
        raise StructureMismatchError(f"cannot factorize {what} = {d}; sizes must be >= 1")
    active = [i for i, t in enumerate(thetas) if t > 1e-9]
    sizes = [1] * len(thetas)
    if not active or d == 1:
        if active:
            sizes[active[-1]] = d
        elif d > 1:
            sizes[-1] = d
        return tuple(sizes)
    if len(active) == 1:
        sizes[active[0]] = d
        return tuple(sizes)
    log_d = math.log(d)
    targets = [math.exp(thetas[i] * log_d) for i in active]
    best_exact: tuple[float, tuple[int, ...]] | None = None
    best_any: tuple[float, tuple[int, ...]] | None = None
    for head in _candidate_heads(d, targets[:-1]):
        last = -(-d // math.prod(head))
        combo = (*head, last)
        deviation = max(
            abs(math.log(x) - thetas[i] * log_d) / log_d for x, i in zip(combo, active, strict=True)
        )
        overhead = math.prod(combo) / d - 1
        if overhead == 0 and (best_exact is None or deviation < best_exact[0]):
            best_exact = (deviation, combo)
        score = overhead + deviation
        if best_any is None or score < best_any[0]:
            best_any = (score, combo)
    assert best_any is not None  # _candidate_heads always yields
    exact_ok = best_exact is not None and best_exact[0] * log_d <= math.log(_EXACT_PREFERENCE)
    chosen = best_exact[1] if exact_ok and best_exact is not None else best_any[1]
    for i, x in zip(active, chosen, strict=True):
        sizes[i] = x
    return tuple(sizes)


def _candidate_heads(d: int, targets: Sequence[float]) -> Iterable[tuple[int, ...]]:
    """Candidate sizes for all active axes but the last: integers near each target and divisors of d."""
    divisors = [k for k in range(1, math.isqrt(d) + 1) if d % k == 0]
    divisors += [d // k for k in divisors]

    def near(t: float) -> list[int]:
        lo, hi = max(1, math.floor(t / 1.5)), max(1, math.ceil(t * 1.5))
        return sorted({*range(lo, hi + 1), *(k for k in divisors if t / 4 <= k <= t * 4)})

    options = [near(t) for t in targets]
    if len(options) == 1:
        yield from ((k,) for k in options[0])
        return
    for k0 in options[0]:
        for k1 in options[1]:
            yield (k0, k1)


def _theta_of(sizes: Sizes, d_in: int, d_out: int) -> Theta:
    """The θ a set of integer sizes realises (each side normalised to sum to 1)."""

    def shares(values: Sequence[int]) -> list[float]:
        total = math.log(math.prod(values))
        return [math.log(v) / total if total > 0 else 0.0 for v in values]

    a, b, g = shares(sizes[0:3])
    if math.prod(sizes[0:3]) == 1:
        a, b, g = 0.0, 0.0, 1.0
    d, e, f = shares(sizes[3:6])
    if math.prod(sizes[3:6]) == 1:
        d, e, f = 0.0, 0.0, 1.0
    small = min(d_in, d_out)
    r = math.log(sizes.rho) / math.log(small) if small > 1 else 0.0
    return Theta(a, b, g, d, e, f, min(1.0, r))


@dataclass(frozen=True)
class EinsumSpec:
    """A point θ of the einsum structure space bound to a layer of shape (d_in, d_out).

    Build one from θ (text or 7 numbers) with ``EinsumSpec(theta, d_in, d_out)``; the integer axis sizes are
    chosen by :func:`factorize` unless given. Named structures (``einrewrite.structure``) give sizes directly.

    Args:
        theta: θ = (α, β, γ, δ, ε, φ, ρ), as ``"(.5|0|.5|0|.5|.5|0)"`` or a sequence of 7 floats.
        d_in: the layer's input features.
        d_out: the layer's output features.
        sizes: integer axis sizes; derived from θ when omitted.
        pad_tolerance: largest allowed relative padding of either side (default 15%).
        name: the registry name of the structure this spec came from.
        hyper: that structure's hyper-parameters, for reports and saving.

    Raises:
        InvalidThetaError: θ breaks a rule of the space (the message names it and a valid neighbour).
        PaddingError: the sizes pad a side by more than ``pad_tolerance``.

    Examples:
        >>> spec = EinsumSpec("(.5|0|.5|0|.5|.5|0)", 1024, 1024)
        >>> spec.sizes.alpha, spec.params, spec.macs
        (32, 65536, 65536)
    """

    theta: Theta
    d_in: int
    d_out: int
    sizes: Sizes = None  # type: ignore[assignment]  # filled in __post_init__
    pad_tolerance: float = DEFAULT_PAD_TOLERANCE
    name: str = "einsum"
    hyper: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if not (isinstance(self.d_in, int) and isinstance(self.d_out, int)) or min(self.d_in, self.d_out) < 1:
            raise StructureMismatchError(
                f"{self.name}: layer sizes must be positive integers, got d_in={self.d_in!r}, d_out={self.d_out!r}"
            )
        theta = validate_theta(
            self.theta if isinstance(self.theta, Theta) else parse_theta(self.theta)  # type: ignore[arg-type]
        )
        object.__setattr__(self, "theta", theta)
        if isinstance(self.hyper, dict):
            object.__setattr__(self, "hyper", tuple(sorted(self.hyper.items())))
        sizes = self.sizes
        if sizes is None:
            sizes = self._sizes_from_theta(theta)
        elif not isinstance(sizes, Sizes):
            sizes = Sizes(*(int(s) for s in sizes))
        object.__setattr__(self, "sizes", sizes)
        self._check_sizes()

    @classmethod
    def from_sizes(
        cls,
        sizes: Sequence[int],
        d_in: int,
        d_out: int,
        *,
        name: str,
        hyper: dict[str, Any] | None = None,
        pad_tolerance: float = DEFAULT_PAD_TOLERANCE,
    ) -> EinsumSpec:
        """Build a spec from integer axis sizes; θ is the point those sizes realise."""
        sizes = Sizes(*(int(s) for s in sizes))
        if min(sizes) < 1:
            raise StructureMismatchError(f"{name}: every axis size must be >= 1, got {tuple(sizes)}")
        try:
            theta = validate_theta(_theta_of(sizes, d_in, d_out))
        except InvalidThetaError as e:
            raise StructureMismatchError(
                f"{name} with {hyper or {}} on a {d_in}->{d_out} layer gives sizes {tuple(sizes)}, "
                f"which fall outside the canonical region: {e}"
            ) from None
        return cls(theta, d_in, d_out, sizes=sizes, pad_tolerance=pad_tolerance, name=name, hyper=hyper or {})

    def _sizes_from_theta(self, theta: Theta) -> Sizes:
        if theta.is_dense:
            return Sizes(1, 1, self.d_in, 1, 1, self.d_out, 1)
        a, b, g = factorize(self.d_in, theta[0:3], what="d_in")
        d, e, f = factorize(self.d_out, theta[3:6], what="d_out")
        small = min(self.d_in, self.d_out)
        r = max(1, round(small**theta.rho))
        return Sizes(a, b, g, d, e, f, r)

    def _check_sizes(self) -> None:
        s = self.sizes
        if min(s) < 1:
            raise StructureMismatchError(f"{self.name}: every axis size must be >= 1, got {tuple(s)}")
        for side, have, need in (("input", s.in_size, self.d_in), ("output", s.out_size, self.d_out)):
            if have < need:
                raise StructureMismatchError(
                    f"{self.name}: sizes {tuple(s)} give an operator {side} of {have} < the layer's {need}; "
                    "einrewrite never drops features: choose sizes whose product covers the layer"
                )
            if have / need - 1 > self.pad_tolerance + 1e-12:
                raise PaddingError(
                    f"{self.name} {self.theta} on a {self.d_in}->{self.d_out} layer pads the {side} from {need} "
                    f"to {have} (+{have / need - 1:.1%}), above the tolerance of {self.pad_tolerance:.0%}; "
                    "pick a θ or hyper-parameters that factor this size, or raise pad_tolerance"
                )

    # ---- shape of the operator -------------------------------------------------------------------------
    @property
    def is_dense(self) -> bool:
        """The dense special case: one (d_out, d_in) weight."""
        return self.theta.is_dense

    @property
    def is_btt(self) -> bool:
        """β = δ = 1 (Monarch / BTT family): the forward runs as two batched matmuls."""
        return not self.is_dense and self.sizes.beta == 1 and self.sizes.delta == 1

    @property
    def padding(self) -> tuple[int, int]:
        """Extra (input, output) features the operator has over the layer."""
        return self.sizes.in_size - self.d_in, self.sizes.out_size - self.d_out

    @property
    def padding_overhead(self) -> float:
        """Relative padding, the larger of the two sides (0 for an exact factorization)."""
        return max(self.sizes.in_size / self.d_in, self.sizes.out_size / self.d_out) - 1

    @property
    def core_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters, by name: ``A (γ, ρ, φ, δ, α)`` and ``B (φ, ε, γ, ρ, β)``, or ``weight``."""
        if self.is_dense:
            return {"weight": (self.d_out, self.d_in)}
        a, b, g, d, e, f, r = self.sizes
        return {"A": (g, r, f, d, a), "B": (f, e, g, r, b)}

    @property
    def core_fans(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each core seen as a matrix inside its batched matmul (paper-notes §4.2)."""
        if self.is_dense:
            return {"weight": (self.d_in, self.d_out)}
        a, b, g, d, e, f, r = self.sizes
        return {"A": (a, d * f * r), "B": (b * g * r, e)}

    @property
    def equation(self) -> str:
        """The contraction, operand 0 being the input viewed as (N, γ, β, α)."""
        return DENSE_EQUATION if self.is_dense else EQUATION

    # ---- counts ----------------------------------------------------------------------------------------
    @property
    def params(self) -> int:
        """Number of parameters of the structured weight (bias excluded)."""
        return sum(math.prod(shape) for shape in self.core_shapes.values())

    @property
    def macs(self) -> int:
        """Multiply-accumulates per token of the planned activation-first contraction (bias excluded)."""
        if self.is_dense:
            return self.d_in * self.d_out
        return min(self.macs_by_order.values())

    @property
    def macs_by_order(self) -> dict[str, int]:
        """MACs per token when the input meets A first (``"xA"``) or B first (``"xB"``)."""
        a, b, g, d, e, f, r = self.sizes
        return {
            "xA": a * b * g * d * f * r + b * g * d * e * f * r,
            "xB": a * b * g * e * f * r + a * g * d * e * f * r,
        }

    @property
    def dense_macs(self) -> int:
        """MACs per token of the dense layer this spec replaces."""
        return self.d_in * self.d_out

    @property
    def rank_bound(self) -> int:
        """Upper bound on rank(W): min(d_in, d_out, φγρ·min(β,ε)·min(α,δ)).

        Tight for random cores when the factorization is exact. When padding crops the last blocks, the
        cropped blocks' null spaces can meet the other stage's range and the generic rank falls a little
        below it (monarch at 97 -> 100: rank 95, bound 97).
        """
        a, b, g, d, e, f, r = self.sizes
        return min(self.d_in, self.d_out, f * g * r * min(b, e) * min(a, d))

    @property
    def omega(self) -> float:
        """Parameter sharing ω of θ (paper-notes §2.2)."""
        return self.theta.omega

    @property
    def psi(self) -> float:
        """Rank exponent ψ of θ."""
        return self.theta.psi

    @property
    def nu(self) -> float:
        """Compute intensity ν of θ."""
        return self.theta.nu

    @property
    def hyper_dict(self) -> dict[str, Any]:
        """The structure's hyper-parameters as a dict."""
        return dict(self.hyper)

    # ---- serialisation ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description; ``EinsumSpec.from_dict(spec.to_dict()) == spec``."""
        return {
            "name": self.name,
            "theta": list(self.theta),
            "d_in": self.d_in,
            "d_out": self.d_out,
            "sizes": list(self.sizes),
            "pad_tolerance": self.pad_tolerance,
            "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in self.hyper},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EinsumSpec:
        """Inverse of :meth:`to_dict`."""
        try:
            hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in data.get("hyper", {}).items()}
            return cls(
                Theta(*data["theta"]),
                int(data["d_in"]),
                int(data["d_out"]),
                sizes=Sizes(*data["sizes"]),
                pad_tolerance=float(data.get("pad_tolerance", DEFAULT_PAD_TOLERANCE)),
                name=str(data.get("name", "einsum")),
                hyper=hyper,
            )
        except (KeyError, TypeError) as e:
            raise StructureMismatchError(f"not a valid EinsumSpec dict ({e!r}): {data!r}") from None

    def build(self, weight: Any, bias: Any = None, *, init: str = "project", zero_last: bool = False) -> Any:
        """The module for this spec from a dense (d_out, d_in) ``weight`` and ``bias``: an EinsumLinear."""
        from .layers import EinsumLinear  # layers imports spec

        return EinsumLinear.from_weight(weight, bias, self, init=init, zero_last=zero_last)  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line: name, hyper-parameters, θ and sizes."""
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyper)
        return f"{self.name}({hyper}) θ={self.theta} sizes={tuple(self.sizes)}"
