"""Budget solvers: choose each layer's hyper-parameters so its MACs land as close to the budget as possible.

Pure functions of sizes: ``(structure, d_in, d_out, budget) -> spec``. Nothing here touches a model.

* Per-layer ratio: among the structure's candidates (``cls.search_space(d_in, d_out)``, bound without error)
  that cost less than the dense layer and at most ``ratio × dense`` MACs, take the most expensive; ties prefer
  full rank (ψ = 1), then less padding.
* Whole-model ``macs_per_token``: find the largest uniform ratio whose per-layer choices fit the total, then
  spend what is left greedily on the layers furthest below their share.

A fixed structure instance (``BTT(rank=2)``, ``Einsum(theta=...)``) is not searched: it is bound and checked.
An instance that leaves some hyper-parameters to the budget (``is_sized_by_budget``, e.g. ``BTTMoE(num_experts=16)``
without splits) is searched over its ``sized_candidates(d_in, d_out)``, keeping what it fixes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import BudgetInfeasibleError, EinrewriteError, StructureMismatchError
from .structures import STRUCTURES

__all__ = ["LayerChoice", "LayerRequest", "candidate_specs", "solve", "solve_layer"]

_PSI_TOL = 1e-9


@dataclass(frozen=True)
class LayerRequest:
    """One layer to size.

    Attributes:
        fqn: the layer's name, used in messages.
        d_in: input features.
        d_out: output features.
        structure: a registry name (searched) or a structure instance (fixed).
        ratio: a per-layer ratio that overrides the global budget for this layer (from an override).
    """

    fqn: str
    d_in: int
    d_out: int
    structure: Any
    ratio: float | None = None

    @property
    def dense_macs(self) -> int:
        """MACs per token of the dense layer."""
        return self.d_in * self.d_out


@dataclass(frozen=True)
class LayerChoice:
    """The solver's answer for one layer: a bound spec, or a skip ``(code, detail)``.

    ``limit`` is the MACs per token the layer was allowed (per-layer budget) or allocated (global budget).
    """

    fqn: str
    spec: Any | None
    limit: int | None
    skip: tuple[str, str] | None = None


@dataclass(frozen=True)
class _Options:
    specs: tuple[Any, ...]  # ascending MACs, all cheaper than dense, one per MACs value
    cheapest: Any | None  # the cheapest spec that bound, even if not cheaper than dense
    error: str | None  # the last bind error, when nothing bound


def _structure_name(structure: Any) -> str:
    return structure if isinstance(structure, str) else type(structure).name


def _is_searched(structure: Any) -> bool:
    """A registry name, or an instance that leaves some hyper-parameters to the budget."""
    return isinstance(structure, str) or bool(getattr(structure, "is_sized_by_budget", False))


def _rank_key(spec: Any) -> tuple[bool, float]:
    """Tie-break among equal MACs: full rank (ψ = 1) first, then less padding."""
    psi = getattr(spec, "psi", 1.0)
    return (abs(psi - 1.0) > _PSI_TOL, float(getattr(spec, "padding_overhead", 0.0)))


@functools.lru_cache(maxsize=1024)
def _options(structure: Any, d_in: int, d_out: int) -> _Options:
    if isinstance(structure, str):
        hypers = STRUCTURES[structure].search_space(d_in, d_out)
    else:  # an instance sized by the budget: its own candidates
        hypers = structure.sized_candidates(d_in, d_out)
    dense = d_in * d_out
    best: dict[int, Any] = {}
    cheapest: Any | None = None
    error: str | None = None
    for hyper in hypers:
        try:
            spec = hyper.bind(d_in, d_out)
        except (EinrewriteError, ValueError) as e:
            error = str(e)
            continue
        if cheapest is None or spec.macs < cheapest.macs:
            cheapest = spec
        if spec.macs >= dense:
            continue
        held = best.get(spec.macs)
        if held is None or _rank_key(spec) < _rank_key(held):
            best[spec.macs] = spec
    return _Options(tuple(best[m] for m in sorted(best)), cheapest, error)


def candidate_specs(structure: Any, d_in: int, d_out: int) -> tuple[Any, ...]:
    """The structure's bound candidates for a layer, ascending in MACs, each cheaper than dense.

    A fixed structure instance gives its single binding (whatever it costs).

    Examples:
        >>> [s.hyper_dict["rank"] for s in candidate_specs("low_rank", 8, 8)]
        [1, 2, 3]
    """
    if not _is_searched(structure):
        return (structure.bind(d_in, d_out),)
    return _options(structure, d_in, d_out).specs


def _fixed(req: LayerRequest) -> Any:
    try:
        return req.structure.bind(req.d_in, req.d_out)
    except (EinrewriteError, ValueError) as e:
        raise StructureMismatchError(
            f"{req.fqn}: {_structure_name(req.structure)} {req.structure} does not fit this "
            f"{req.d_in}->{req.d_out} layer: {e}; let einrewrite size it (structure="
            f"{_structure_name(req.structure)!r}) or exclude '{req.fqn}'"
        ) from None


def _skip_or_none(req: LayerRequest) -> tuple[str, str] | None:
    """The skip reason of a searched structure with no candidate cheaper than dense, else None."""
    name = _structure_name(req.structure)
    opts = _options(req.structure, req.d_in, req.d_out)
    if opts.specs:
        return None
    if opts.cheapest is None:
        if opts.error is None:
            return (
                "no_fit",
                f"{name} has nothing to search for a {req.d_in}->{req.d_out} layer; give a fixed structure "
                "(e.g. Einsum(theta=...)) in an override",
            )
        return "no_fit", f"no {name} hyper-parameters fit a {req.d_in}->{req.d_out} layer ({opts.error})"
    return (
        "dense_cheaper",
        f"the cheapest {name} ({opts.cheapest.describe()}) costs {opts.cheapest.macs:,} MACs/token, not less "
        f"than the dense layer's {req.dense_macs:,}; dense is cheaper",
    )


def solve_layer(req: LayerRequest, ratio: float) -> LayerChoice:
    """Size one layer under a per-layer ratio.

    Raises:
        BudgetInfeasibleError: even the cheapest candidate costs more than the budget allows.
        StructureMismatchError: a fixed structure does not fit the layer.

    Examples:
        >>> solve_layer(LayerRequest("fc", 768, 768, "btt"), 0.25).spec.hyper_dict["rank"]
        3
    """
    limit = math.floor(ratio * req.dense_macs + 1e-9)
    if not _is_searched(req.structure):
        spec = _fixed(req)
        if spec.macs > limit:
            raise BudgetInfeasibleError(
                f"{req.fqn}: {spec.describe()} needs {spec.macs:,} MACs/token for a {req.d_in}->{req.d_out} layer "
                f"but the budget allows {limit:,} ({ratio:.4g}x of dense {req.dense_macs:,}); raise the budget to "
                f"at least {spec.macs / req.dense_macs:.4g}, let einrewrite size the layer "
                f"(structure={_structure_name(req.structure)!r}) or exclude '{req.fqn}'"
            )
        return LayerChoice(req.fqn, spec, limit)
    skip = _skip_or_none(req)
    if skip is not None:
        return LayerChoice(req.fqn, None, limit, skip)
    specs = _options(req.structure, req.d_in, req.d_out).specs
    fitting = [s for s in specs if s.macs <= limit]
    if not fitting:
        least = specs[0]
        raise BudgetInfeasibleError(
            f"{req.fqn}: {_structure_name(req.structure)} needs >= {least.macs:,} MACs/token for a "
            f"{req.d_in}->{req.d_out} layer "
            f"(at {least.hyper_dict}) but the budget allows {limit:,} ({ratio:.4g}x of dense {req.dense_macs:,}); "
            f"raise the budget to at least {math.ceil(least.macs / req.dense_macs * 1e4) / 1e4:.4g} or exclude "
            f"'{req.fqn}'"
        )
    return LayerChoice(req.fqn, fitting[-1], limit)


def _pick(specs: Sequence[Any], limit: float) -> int:
    """Index of the most expensive spec within ``limit``; 0 (the cheapest) when none fits."""
    lo, hi = 0, len(specs) - 1
    if specs[0].macs > limit:
        return 0
    while lo < hi:  # largest index with macs <= limit (specs ascend)
        mid = (lo + hi + 1) // 2
        if specs[mid].macs <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def solve(requests: Sequence[LayerRequest], budget: Any) -> list[LayerChoice]:
    """Size every layer under ``budget`` (a :class:`~einrewrite.config.FlopBudget`); order is preserved.

    Raises:
        BudgetInfeasibleError: a layer (per-layer ratio), or the whole set (``macs_per_token``), cannot fit.

    Examples:
        >>> from einrewrite.config import FlopBudget
        >>> reqs = [LayerRequest("a", 64, 64, "low_rank"), LayerRequest("b", 64, 256, "low_rank")]
        >>> sum(c.spec.macs for c in solve(reqs, FlopBudget(macs_per_token=4000)))
        3968
    """
    choices: dict[str, LayerChoice] = {}
    flexible: list[LayerRequest] = []
    for req in requests:
        if not budget.is_global:
            choices[req.fqn] = solve_layer(req, req.ratio if req.ratio is not None else budget.ratio)
        elif req.ratio is not None:
            choices[req.fqn] = solve_layer(req, req.ratio)
        elif not _is_searched(req.structure):
            spec = _fixed(req)
            choices[req.fqn] = LayerChoice(req.fqn, spec, spec.macs)
        else:
            skip = _skip_or_none(req)
            if skip is not None:
                choices[req.fqn] = LayerChoice(req.fqn, None, None, skip)
            else:
                flexible.append(req)
    if budget.is_global:
        choices.update(_allocate(flexible, budget.macs_per_token, choices))
    return [choices[req.fqn] for req in requests]


def _allocate(
    flexible: Sequence[LayerRequest], total: int, fixed: dict[str, LayerChoice]
) -> dict[str, LayerChoice]:
    """Spread ``total`` MACs/token (less what fixed layers use) across the flexible layers."""
    used = sum(c.spec.macs for c in fixed.values() if c.spec is not None)
    remaining = total - used
    options = [_options(req.structure, req.d_in, req.d_out).specs for req in flexible]
    least = sum(specs[0].macs for specs in options)
    if least > remaining:
        need = used + least
        worst = max(range(len(flexible)), key=lambda i: options[i][0].macs, default=None)
        head = flexible[worst].fqn if worst is not None else "model"
        detail = (
            f" ({head} alone needs >= {options[worst][0].macs:,} as {_structure_name(flexible[worst].structure)})"
            if worst is not None
            else ""
        )
        raise BudgetInfeasibleError(
            f"{head}: the budget of {total:,} MACs/token is below the least the rewritten layers can cost, "
            f"{need:,} MACs/token{detail}; raise macs_per_token to at least {need:,} or exclude layers"
        )
    if not flexible:
        return {}

    def cost(ratio: float) -> tuple[int, list[int]]:
        picks = [_pick(specs, ratio * req.dense_macs) for specs, req in zip(options, flexible, strict=True)]
        return sum(options[i][p].macs for i, p in enumerate(picks)), picks

    lo, hi = 0.0, 1.0
    best_cost, picks = cost(lo)
    for _ in range(48):  # largest uniform ratio whose choices fit
        mid = (lo + hi) / 2
        c, p = cost(mid)
        if c <= remaining:
            lo, best_cost, picks = mid, c, p
        else:
            hi = mid
    spent = best_cost
    improved = True
    while improved:  # greedy top-up: the layer furthest below its share first
        improved = False
        order = sorted(range(len(flexible)), key=lambda i: options[i][picks[i]].macs / flexible[i].dense_macs)
        for i in order:
            nxt = picks[i] + 1
            if nxt < len(options[i]):
                delta = options[i][nxt].macs - options[i][picks[i]].macs
                if spent + delta <= remaining:
                    picks[i], spent, improved = nxt, spent + delta, True
                    break
    return {
        req.fqn: LayerChoice(req.fqn, options[i][picks[i]], options[i][picks[i]].macs)
        for i, req in enumerate(flexible)
    }
