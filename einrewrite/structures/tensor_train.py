"""Tensor-train (two cores): W = Σ_ρ B_ρ ⊗ A_ρ; Kronecker axes plus a bond ρ = rank; θ = (½|½|0|½|½|0|θρ)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..spec import EinsumSpec
from ._base import check_positive_int
from .kronecker import kronecker_sizes


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorTrain:
    """A sum of ``rank`` Kronecker products (a two-core tensor-train matrix)."""

    name: ClassVar[str] = "tensor_train"
    rank: int = 2

    def __post_init__(self) -> None:
        check_positive_int(self.name, "rank", self.rank)

    def bind(self, d_in: int, d_out: int) -> EinsumSpec:
        """Kronecker sizes with ρ = rank."""
        sizes = kronecker_sizes(d_in, d_out, self.rank)
        return EinsumSpec.from_sizes(sizes, d_in, d_out, name=self.name, hyper={"rank": self.rank})

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[TensorTrain]:
        """Every bond up to the smaller private axis (the canonical region's limit)."""
        sizes = kronecker_sizes(d_in, d_out, 1)
        for rank in range(1, min(sizes[0], sizes[4]) + 1):
            yield cls(rank=rank)

    @classmethod
    def example(cls) -> TensorTrain:
        """An instance for registry-wide tests."""
        return cls(rank=2)
