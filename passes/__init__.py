"""Passes over a model being rewritten (installed as ``einrewrite.passes``).

Each pass is ``name(model, ctx) -> PassResult``; :data:`DEFAULT_PIPELINE` is the explicit order
:func:`einrewrite.rewrite` runs them in.
"""

from __future__ import annotations

from .manager import PassContext, PassResult, Plan, run_pipeline
from .replace_linear import replace_linear
from .select import find_targets, size_targets
from .swap_modules import swap_modules
from .trace import GraphInfo, LinearUse, export_graph, find_linear_uses, trace_model
from .verify import BypassedLayerError, VerificationError, verify_rewrite

__all__ = [
    "DEFAULT_PIPELINE",
    "BypassedLayerError",
    "GraphInfo",
    "LinearUse",
    "PassContext",
    "PassResult",
    "Plan",
    "VerificationError",
    "export_graph",
    "find_linear_uses",
    "find_targets",
    "replace_linear",
    "run_pipeline",
    "size_targets",
    "swap_modules",
    "trace_model",
    "verify_rewrite",
]

# find what is there -> trace when a bare parameter needs the graph path -> size to the budget ->
# swap modules (eager) or replace graph nodes -> prove every new layer is on the forward path.
DEFAULT_PIPELINE = (find_targets, trace_model, size_targets, swap_modules, replace_linear, verify_rewrite)
