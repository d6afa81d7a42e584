"""Monarch: block-diagonal, transpose, block-diagonal; θ = (½|0|½|0|½|½|0) at the default block count.

Sizes: γ = φ = blocks, α = ⌈d_in / blocks⌉, ε = ⌈d_out / blocks⌉, β = δ = ρ = 1 (the BTT fast path).
"""

from __future__ import annotations

from collections.abc import Iterator
import math
from dataclasses import dataclass
from typing import ClassVar

from ..spec import EinsumSpec
from ._base import check_positive_int


def default_blocks(d_in: int, d_out: int) -> int:
    """The block count near √d_in that pads both sides least (ties: closer to √d_in, then more blocks)."""
    root = math.sqrt(d_in)

    def score(blocks: int) -> tuple[float, float, int]:
        pad_in = -(-d_in // blocks) * blocks / d_in - 1
        pad_out = -(-d_out // blocks) * blocks / d_out - 1
        return (round(max(pad_in, pad_out), 6), round(abs(math.log(blocks / root)), 6), -blocks)

    return min(range(max(1, math.floor(root / 2)), math.ceil(root * 2) + 1), key=score)


@dataclass(frozen=True, slots=True, kw_only=True)
class Monarch:
    """Two block-diagonal stages with ``blocks`` blocks each (default: ≈ √d_in, padding both sides least)."""

    name: ClassVar[str] = "monarch"
    blocks: int | None = None

    def __post_init__(self) -> None:
        if self.blocks is not None:
            check_positive_int(self.name, "blocks", self.blocks)

    def bind(self, d_in: int, d_out: int) -> EinsumSpec:
        """Sizes (⌈d_in/b⌉, 1, b, 1, ⌈d_out/b⌉, b, 1)."""
        blocks = self.blocks if self.blocks is not None else default_blocks(d_in, d_out)
        sizes = (-(-d_in // blocks), 1, blocks, 1, -(-d_out // blocks), blocks, 1)
        return EinsumSpec.from_sizes(sizes, d_in, d_out, name=self.name, hyper={"blocks": blocks})

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[Monarch]:
        """Every block count from 2 to d_in // 2 (padding is checked when each is bound)."""
        for blocks in range(2, max(2, d_in // 2) + 1):
            yield cls(blocks=blocks)

    @classmethod
    def example(cls) -> Monarch:
        """An instance for registry-wide tests."""
        return cls()
