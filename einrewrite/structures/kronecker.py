"""Kronecker: W = B ⊗ A with A: (δ, α), B: (ε, β); θ = (½|½|0|½|½|0|0), ω = ½ (parameters shared)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..spec import EinsumSpec, factorize


def kronecker_sizes(d_in: int, d_out: int, rank: int) -> tuple[int, ...]:
    """Balanced split of both sides; the larger factor goes to α (resp. ε) to stay in the canonical region."""
    small_in, large_in = sorted(factorize(d_in, (0.5, 0.5), what="d_in"))
    small_out, large_out = sorted(factorize(d_out, (0.5, 0.5), what="d_out"))
    return (large_in, small_in, 1, small_out, large_out, 1, rank)


@dataclass(frozen=True, slots=True, kw_only=True)
class Kronecker:
    """The Kronecker product of two balanced factors."""

    name: ClassVar[str] = "kronecker"

    def bind(self, d_in: int, d_out: int) -> EinsumSpec:
        """Sizes (α, β, 1, δ, ε, 1, 1) with α·β ≥ d_in and δ·ε ≥ d_out."""
        return EinsumSpec.from_sizes(kronecker_sizes(d_in, d_out, 1), d_in, d_out, name=self.name)

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[Kronecker]:
        """Kronecker has no hyper-parameter."""
        yield cls()

    @classmethod
    def example(cls) -> Kronecker:
        """An instance for registry-wide tests."""
        return cls()
