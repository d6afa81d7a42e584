"""ONNX translations for custom ops that other libraries put in the models users bring.

The torch exporter knows ATen, not the custom ops a library registers; a model that calls one fails to export
even when nothing einrewrite touched uses it. :func:`known_translations` gives the translations for the ones
seen in models we are asked to export, keyed by the op, for those ops the running process has registered
(nothing is imported here to register them):

* ``transformers::grouped_mm_fallback`` (transformers >= 5, the fused experts of Mixtral, Qwen-MoE, ...):
  ``(S, K)`` rows sorted by expert, weights ``(E, K, N)``, ``offs`` the cumulative row count per expert.
  Exported as one ``Slice`` + ``MatMul`` per expert (E is static, the row counts are not) and one ``Concat``;
  rows past ``offs[-1]`` (expert-parallel sentinels) are zeros, as in the eager op.

:func:`einrewrite.export_onnx` merges these with einrewrite's own (BTT-MoE) translations and the caller's
``custom_translation_table``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["known_translations"]


def _grouped_mm(x: Any, weight: Any, offs: Any) -> Any:
    """ONNX of ``transformers::grouped_mm_fallback``: x (S, K), weight (E, K, N), offs (E,) -> (S, N)."""
    from onnxscript import opset18 as op

    experts = weight.shape[0]  # static: the fused expert tensor's leading axis
    if not isinstance(experts, int):
        raise TypeError(f"grouped_mm_fallback needs a static expert count, got weight shape {weight.shape}")
    ends = op.Cast(offs, to=7)  # (E,) int64: row where each expert's group ends
    starts = op.Concat(op.Constant(value_ints=[0]), ends, axis=0)  # (E+1,): 0, then each group's end
    axis = op.Constant(value_ints=[0])
    outs = []
    for i in range(experts):
        begin = op.Slice(starts, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]))  # (1,) = ends[i-1]
        end = op.Slice(ends, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]))  # (1,)
        rows = op.Slice(x, begin, end, axis)  # (m_i, K): empty when the expert got no rows
        w = op.Gather(weight, op.Constant(value_int=i), axis=0)  # (K, N)
        outs.append(op.MatMul(rows, w))  # (m_i, N)
    last = op.Slice(starts, op.Constant(value_ints=[experts]), op.Constant(value_ints=[experts + 1]))  # (1,)
    width = op.Shape(weight, start=2, end=3)  # (1,) N
    tail_rows = op.Sub(op.Shape(x, start=0, end=1), last)  # (1,) rows past offs[-1]: 0 unless sentinels
    tail = op.Expand(op.CastLike(op.Constant(value_float=0.0), x), op.Concat(tail_rows, width, axis=0))  # (t, N)
    return op.Concat(*outs, tail, axis=0)  # (S, N)


def _registered(namespace: str, name: str) -> Any | None:
    """``torch.ops.<namespace>.<name>.default`` when some library registered it in this process, else None."""
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except (AttributeError, RuntimeError):
        return None


def known_translations() -> dict[Any, Callable[..., Any]]:
    """Translations for the registered third-party custom ops this module knows, keyed by ``OpOverload``.

    Examples:
        >>> table = known_translations()
        >>> all(callable(fn) for fn in table.values())
        True
    """
    table: dict[Any, Callable[..., Any]] = {}
    grouped = _registered("transformers", "grouped_mm_fallback")
    if grouped is not None:
        table[grouped] = _grouped_mm
    return table
