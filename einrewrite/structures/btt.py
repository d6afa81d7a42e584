"""Block Tensor-Train: a sum of ``rank`` Monarch-like matrices; θ = (θα|0|1-θα|0|θε|1-θε|θρ).

Sizes: (α, γ) split d_in with shares (in_split, 1-in_split), (ε, φ) split d_out with (out_split,
1-out_split), ρ = rank, β = δ = 1 (the BTT fast path). Full rank (ψ = 1) when in_split + out_split ≤ 1 + θρ.
"""

from __future__ import annotations

from collections.abc import Iterator
import math
from dataclasses import dataclass
from typing import ClassVar

from ..spec import EinsumSpec, factorize
from ._base import check_fraction, check_positive_int

# (θα, θε) splits the budget solver tries, from the paper's BTT points (paper-notes §1.4).
_SPLITS = ((0.5, 0.5), (1 / 3, 2 / 3), (2 / 3, 1 / 3), (0.25, 0.75), (0.75, 0.25))


@dataclass(frozen=True, slots=True, kw_only=True)
class BTT:
    """Block Tensor-Train with bond ``rank`` and the θ split of each side."""

    name: ClassVar[str] = "btt"
    rank: int = 1
    in_split: float = 0.5
    out_split: float = 0.5

    def __post_init__(self) -> None:
        check_positive_int(self.name, "rank", self.rank)
        check_fraction(self.name, "in_split", self.in_split)
        check_fraction(self.name, "out_split", self.out_split)

    def bind(self, d_in: int, d_out: int) -> EinsumSpec:
        """Sizes (α, 1, γ, 1, ε, φ, rank)."""
        alpha, gamma = factorize(d_in, (self.in_split, 1 - self.in_split), what="d_in")
        epsilon, phi = factorize(d_out, (self.out_split, 1 - self.out_split), what="d_out")
        hyper = {"rank": self.rank, "in_split": self.in_split, "out_split": self.out_split}
        return EinsumSpec.from_sizes(
            (alpha, 1, gamma, 1, epsilon, phi, self.rank), d_in, d_out, name=self.name, hyper=hyper
        )

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[BTT]:
        """Ranks up to √min(d_in, d_out) over a grid of θ splits (the paper's full- and low-rank BTT points)."""
        max_rank = max(1, math.isqrt(min(d_in, d_out)))
        for in_split, out_split in _SPLITS:
            for rank in range(1, max_rank + 1):
                yield cls(rank=rank, in_split=in_split, out_split=out_split)

    @classmethod
    def example(cls) -> BTT:
        """An instance for registry-wide tests."""
        return cls(rank=2)
