"""The registry of structures: one literal dict, name -> spec class.

Adding a structure touches one file (its spec), one line here and one row of the README table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from ..errors import StructureMismatchError
from ..spec import EinsumSpec
from .btt import BTT
from .btt_moe import BTTMoE
from .dense import Dense
from .einsum import Einsum
from .kronecker import Kronecker
from .low_rank import LowRank
from .monarch import Monarch
from .tensor_train import TensorTrain

__all__ = [
    "BTT",
    "BTTMoE",
    "STRUCTURES",
    "Dense",
    "Einsum",
    "Kronecker",
    "LowRank",
    "Monarch",
    "StructureSpec",
    "TensorTrain",
    "register_structure",
    "structure",
]


class StructureSpec(Protocol):
    """What a registered structure provides: hyper-parameters as fields, ``bind`` and ``example``."""

    name: str

    def bind(self, d_in: int, d_out: int) -> EinsumSpec: ...


STRUCTURES: dict[str, Any] = {
    "dense": Dense,
    "low_rank": LowRank,
    "kronecker": Kronecker,
    "tensor_train": TensorTrain,
    "monarch": Monarch,
    "btt": BTT,
    "btt_moe": BTTMoE,
    "einsum": Einsum,
}


def register_structure(name: str, cls: Any) -> None:
    """Add a structure for plugins; raises on a duplicate name."""
    if name in STRUCTURES:
        raise StructureMismatchError(f"a structure named {name!r} is already registered ({STRUCTURES[name]!r})")
    STRUCTURES[name] = cls


def make_structure(name: str, **hyper: Any) -> Any:
    """Instantiate the registered structure ``name`` with its hyper-parameters, with errors that help."""
    if name not in STRUCTURES:
        raise StructureMismatchError(f"unknown structure {name!r}; registered: {', '.join(sorted(STRUCTURES))}")
    cls = STRUCTURES[name]
    try:
        return cls(**hyper)
    except TypeError as e:
        allowed = ", ".join(f.name for f in dataclasses.fields(cls)) or "none"
        raise StructureMismatchError(
            f"structure {name!r} got hyper-parameters {hyper}: {e}; allowed: {allowed}"
        ) from None


def structure(name: str, d_in: int, d_out: int, **hyper: Any) -> EinsumSpec:
    """The spec of structure ``name`` with hyper-parameters ``hyper``, bound to a (d_in, d_out) layer.

    Examples:
        >>> structure("monarch", 1024, 1024).sizes.gamma
        32
    """
    return make_structure(name, **hyper).bind(d_in, d_out)
