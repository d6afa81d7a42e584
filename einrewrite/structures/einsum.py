"""Any point θ of the einsum structure space, given as text ``"(α|β|γ|δ|ε|φ|ρ)"`` or 7 numbers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ..spec import DEFAULT_PAD_TOLERANCE, EinsumSpec
from ..theta import parse_theta, validate_theta


@dataclass(frozen=True, slots=True, kw_only=True)
class Einsum:
    """The general structure: integer sizes come from θ by :func:`einrewrite.spec.factorize`."""

    name: ClassVar[str] = "einsum"
    theta: str | Sequence[float]
    pad_tolerance: float = DEFAULT_PAD_TOLERANCE

    def __post_init__(self) -> None:
        validate_theta(parse_theta(self.theta))

    def bind(self, d_in: int, d_out: int) -> EinsumSpec:
        """Sizes from θ (exact factorizations preferred, padding within ``pad_tolerance``)."""
        theta = parse_theta(self.theta)
        return EinsumSpec(
            theta, d_in, d_out, pad_tolerance=self.pad_tolerance, name=self.name, hyper={"theta": str(theta)}
        )

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[Einsum]:
        """A θ fixes everything: there is nothing to search without one."""
        return iter(())

    @classmethod
    def example(cls) -> Einsum:
        """An instance for registry-wide tests: a generic point with every axis in use."""
        return cls(theta="(.5|.25|.25|.25|.5|.25|.25)")
