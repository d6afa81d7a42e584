"""Tensor-train (two cores): W = Σ_ρ B_ρ ⊗ A_ρ; Kronecker axes plus a bond ρ = rank; θ = (½|½|0|½|½|0|θρ)."""

from __future__ import annotations

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
    def example(cls) -> TensorTrain:
        """An instance for registry-wide tests."""
        return cls(rank=2)
