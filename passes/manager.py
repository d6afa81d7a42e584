"""Running passes: the shared `PassContext`, `PassResult` and `run_pipeline`.

A pass is a pure function ``name(model, ctx) -> PassResult``. Facts found along the way live in the context
(candidates, sizes, the traced graph, decisions); the model flows from one pass to the next because a pass may
return a different module (the graph path returns an FX ``GraphModule``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from ..config import RewriteConfig
from ..errors import EinrewriteError
from ..report import Decision
from ..targets import Candidate

__all__ = ["Pass", "PassContext", "PassResult", "Plan", "run_pipeline"]

logger = logging.getLogger(__name__)


class PassResult(NamedTuple):
    """What a pass returns: the (possibly new) model and whether it changed anything."""

    model: nn.Module
    modified: bool


@dataclass
class Plan:
    """A candidate chosen for replacement, with its bound spec and the MACs it was allowed."""

    candidate: Candidate
    spec: Any
    limit: int | None


@dataclass
class PassContext:
    """State shared by the passes of one rewrite.

    Attributes:
        config: the validated config.
        args: positional example inputs (None when the caller gave none).
        kwargs: keyword example inputs.
        mode: ``"auto"``, ``"module"`` or ``"graph"``.
        progress: show a progress bar (None: only on a terminal).
        verify: run the liveness check after the rewrite.
        reference: the dense model's outputs on the example inputs (for shape/dtype parity and the deviation).
        candidates: what :func:`find_targets` found.
        rule_skips: fqn -> (code, detail) for candidates the rules or capabilities leave alone.
        graph: the traced graph (:class:`einrewrite.passes.trace.GraphInfo`) on the graph path.
        trace_error: why tracing failed (auto mode falls back to the module path).
        plans: fqn -> :class:`Plan` of the layers to replace, in model order.
        decisions: fqn -> :class:`Decision`, filled as layers are replaced or skipped.
        path: ``"module"`` or ``"graph"``.
        notes: messages for the report.
        verified: result of the liveness check (None when not run).
        output_error: relative output deviation measured by the check.
        noop: the model was already rewritten.
        current: the FQN being worked on, for error messages.
        done: how many layers the current pass has finished.
    """

    config: RewriteConfig
    args: tuple[Any, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str = "auto"
    progress: bool | None = None
    verify: bool = True
    reference: Any = None
    candidates: list[Candidate] = field(default_factory=list)
    rule_skips: dict[str, tuple[str, str]] = field(default_factory=dict)
    graph: Any = None
    trace_error: str | None = None
    plans: dict[str, Plan] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    path: str = "module"
    notes: list[str] = field(default_factory=list)
    verified: bool | None = None
    output_error: float | None = None
    noop: bool = False
    current: str | None = None
    done: int = 0

    @property
    def has_inputs(self) -> bool:
        """Whether example inputs were given (tracing and the liveness check need them)."""
        return self.args is not None

    def skip(self, cand: Candidate, code: str, detail: str) -> None:
        """Record that ``cand`` stays as it is, and why."""
        kind = "F.linear" if cand.kind == "param" else cand.kind
        params = cand.weight_numel
        spec = cand.module.spec if cand.kind == "structured" else None  # kept so a reload rebuilds it
        self.decisions[cand.fqn] = Decision(
            fqn=cand.fqn,
            kind=kind,
            status="skipped",
            reason=code,
            detail=detail,
            d_in=cand.d_in,
            d_out=cand.d_out,
            has_bias=cand.has_bias,
            params_before=params,
            params_after=params,
            macs_before=cand.dense_macs if cand.kind != "structured" else cand.module.spec.macs,
            macs_after=cand.dense_macs if cand.kind != "structured" else cand.module.spec.macs,
            weight_fqn=cand.weight_fqn,
            structure=None if spec is None else spec.name,
            hyper=None if spec is None else spec.hyper_dict,
            spec=None if spec is None else spec.to_dict(),
        )

    def replace(self, plan: Plan, module: nn.Module, *, path: str, layout: str) -> None:
        """Record that the planned layer was replaced by ``module``."""
        cand, spec = plan.candidate, plan.spec
        self.decisions[cand.fqn] = Decision(
            fqn=cand.fqn,
            kind="F.linear" if cand.kind == "param" else cand.kind,
            status="replaced",
            detail=spec.describe(),
            path=path,
            d_in=cand.d_in,
            d_out=cand.d_out,
            has_bias=cand.has_bias,
            structure=spec.name,
            hyper=spec.hyper_dict,
            spec=spec.to_dict(),
            params_before=cand.weight_numel,
            params_after=int(spec.params),
            macs_before=cand.dense_macs,
            macs_after=int(spec.macs),
            budget_macs=plan.limit,
            projection_error=getattr(module, "projection_error", None),
            weight_fqn=cand.weight_fqn,
            weight_layout=layout,
        )


Pass = Callable[[nn.Module, PassContext], PassResult]


def run_pipeline(model: nn.Module, ctx: PassContext, passes: Sequence[Pass]) -> nn.Module:
    """Run ``passes`` in order and return the final model.

    An :class:`EinrewriteError` passes through unchanged (it already names its layer); any other exception is
    re-raised as ``EinrewriteError("pass 'name' failed on 'fqn' after N layers: ...")`` chained to the original.
    """
    for step in passes:
        name = getattr(step, "__name__", repr(step))
        ctx.current, ctx.done = None, 0
        start = time.perf_counter()
        try:
            model, modified = step(model, ctx)
        except EinrewriteError:
            raise
        except Exception as e:
            where = ctx.current if ctx.current is not None else "<model>"
            raise EinrewriteError(
                f"{where}: pass {name!r} failed after {ctx.done} layers: {type(e).__name__}: {e} (rerun with "
                "--debug or catch the chained exception for the traceback)"
            ) from e
        logger.debug("pass %s: modified=%s in %.3fs", name, modified, time.perf_counter() - start)
    return model
