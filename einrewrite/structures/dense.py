"""Dense: the unstructured (d_out, d_in) weight, θ = (0|0|1|0|0|1|0). Letters: n batch, i in, o out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from ..spec import EinsumSpec
from ..theta import Theta


@dataclass(frozen=True, slots=True, kw_only=True)
class Dense:
    """The dense layer itself, the reference point (ω, ψ, ν) = (0, 1, 1) of every comparison."""

    name: ClassVar[str] = "dense"

    def bind(self, d_in: int, d_out: int) -> EinsumSpec:
        """The spec of a dense (d_out, d_in) weight."""
        return EinsumSpec(Theta(0, 0, 1, 0, 0, 1, 0), d_in, d_out, name=self.name)

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[Dense]:
        """Every hyper-parameter choice for a (d_in, d_out) layer (for the budget solver)."""
        yield cls()

    @classmethod
    def example(cls) -> Dense:
        """An instance for registry-wide tests."""
        return cls()
