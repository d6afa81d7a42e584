"""Flushing denormal floats to zero (FTZ/DAZ) while ONNX Runtime runs on the CPU.

ONNX Runtime's CPU ``Exp`` and ``Softmax`` (MLAS) slow down by about 14x on values whose exponential underflows
(below about -88 in float32): the result passes through denormal floats, which x86 cores handle in microcode.
A causal attention mask puts such values, ``-inf``, in half of every score matrix. Measured on the 2-core
development machine (2026-12-01, ORT 1.32, 2 threads, ``/tmp/exp13/sm*.py``): ``Softmax`` over (8, 16, 256, 256)
scores takes 1.7 ms, and 13.2-14.4 ms once the causal mask is added, whether its value is ``-inf``, the float32
minimum or -1e4; with denormals flushed on every thread that runs it, 3.2 ms.

ORT's session option ``session.set_denormal_as_zero`` flushes them on its own worker threads only, and the
thread that calls ``run`` works through part of every parallel loop: both must flush.
:func:`denormals_flushed` does it for the calling thread; ``einrewrite.export.onnxruntime_session(...,
flush_denormals=True)`` does both. Flushing changes only results below 1.2e-38, which a float32 model's outputs
never hold at its tolerance.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["denormals_flushed", "flushes_denormals", "flushing_denormals"]

# 1.5e-39, below float32's smallest normal (1.18e-38); made from its bits, since a conversion would be flushed
# in a process that imports this module while flushing
_DENORMAL = np.array([0x0010_0000], dtype=np.uint32).view(np.float32)
_Result = TypeVar("_Result")


def flushes_denormals() -> bool:
    """Whether the calling thread flushes denormal floats to zero (torch has no getter: this computes one).

    Examples:
        >>> with denormals_flushed():
        ...     flushes_denormals()
        True
    """
    return float((_DENORMAL * np.float32(2.0))[0]) == 0.0  # numpy computes on this thread: 2 µs, torch 14 µs


@contextlib.contextmanager
def denormals_flushed() -> Iterator[bool]:
    """Flush denormals to zero on the calling thread inside the block, and restore its previous mode after.

    Yields whether the CPU supports it (x86 with SSE3, AArch64); where it does not, the block runs unchanged.
    Only this thread's floating-point mode changes: torch's and ORT's worker threads keep theirs.
    """
    before = flushes_denormals()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        torch.set_flush_denormal(before)


def flushing_denormals(run: Callable[..., _Result]) -> Callable[..., _Result]:
    """``run`` wrapped in :func:`denormals_flushed`, e.g. an ``InferenceSession.run``."""

    @functools.wraps(run)
    def flushed(*args: Any, **kwargs: Any) -> _Result:
        with denormals_flushed():
            return run(*args, **kwargs)

    return flushed
