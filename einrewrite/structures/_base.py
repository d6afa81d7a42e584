"""Shared validation helpers for structure specs."""

from __future__ import annotations

from ..errors import StructureMismatchError


def check_positive_int(structure: str, field: str, value: object) -> None:
    """Raise unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StructureMismatchError(f"{structure}.{field} must be an integer >= 1, got {value!r}")


def check_fraction(structure: str, field: str, value: object) -> None:
    """Raise unless ``value`` is a number strictly between 0 and 1."""
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise StructureMismatchError(f"{structure}.{field} must be a number in (0, 1), got {value!r}")
