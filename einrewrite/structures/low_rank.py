"""Low-rank: W = B A with A: (rank, d_in), B: (d_out, rank); θ = (1|0|0|0|1|0|θρ).

Sizes: α = d_in, ε = d_out, ρ = rank, the rest 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..errors import StructureMismatchError
from ..spec import EinsumSpec
from ._base import check_positive_int


@dataclass(frozen=True, slots=True, kw_only=True)
class LowRank:
    """A rank-``rank`` factorization; full rank (rank = min(d_in, d_out)) represents any weight exactly."""

    name: ClassVar[str] = "low_rank"
    rank: int

    def __post_init__(self) -> None:
        check_positive_int(self.name, "rank", self.rank)

    def bind(self, d_in: int, d_out: int) -> EinsumSpec:
        """Sizes (d_in, 1, 1, 1, d_out, 1, rank)."""
        if self.rank > min(d_in, d_out):
            raise StructureMismatchError(
                f"low_rank(rank={self.rank}) on a {d_in}->{d_out} layer: rank must be <= min(d_in, d_out) = "
                f"{min(d_in, d_out)}"
            )
        return EinsumSpec.from_sizes(
            (d_in, 1, 1, 1, d_out, 1, self.rank), d_in, d_out, name=self.name, hyper={"rank": self.rank}
        )

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[LowRank]:
        """Every rank from 1 to min(d_in, d_out)."""
        for rank in range(1, min(d_in, d_out) + 1):
            yield cls(rank=rank)

    @classmethod
    def example(cls) -> LowRank:
        """An instance for registry-wide tests."""
        return cls(rank=2)
