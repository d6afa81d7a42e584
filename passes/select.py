"""Choosing what to rewrite: `find_targets` (the rules) and `size_targets` (the budget)."""

from __future__ import annotations

from collections import Counter

from torch import nn

from ..budget import LayerRequest, solve
from ..errors import NoTargetsError
from ..targets import find_candidates, matches_any, output_heads, override_for, skip_reason
from .manager import PassContext, PassResult, Plan

__all__ = ["find_targets", "size_targets"]


def find_targets(model: nn.Module, ctx: PassContext) -> PassResult:
    """Find every candidate and apply the targeting rules; does not change the model."""
    ctx.candidates = find_candidates(model)
    heads = output_heads(model)
    for cand in ctx.candidates:
        ctx.current = cand.fqn
        reason = skip_reason(model, cand, ctx.config, heads=heads)
        if reason is not None:
            ctx.rule_skips[cand.fqn] = reason
    _note_unmatched_rules(ctx)
    return PassResult(model, False)


def _note_unmatched_rules(ctx: PassContext) -> None:
    """PEFT warns when an exclude entry matched nothing; say so in the report, for excludes and targets."""
    names = [n for c in ctx.candidates for n in c.names]
    for field_name in ("exclude_modules", "target_modules"):
        rule = getattr(ctx.config, field_name)
        if rule is None or rule == "all-linear":
            continue
        entries = (rule,) if isinstance(rule, str) else rule
        for entry in entries:
            if matches_any(names, entry if isinstance(rule, str) else (entry,)) is None:
                ctx.notes.append(f"{field_name} entry {entry!r} matched no layer")


def size_targets(model: nn.Module, ctx: PassContext) -> PassResult:
    """Size every remaining candidate to the budget; record skips; raise if nothing is left to do.

    Raises:
        BudgetInfeasibleError: a layer (or the whole set, for ``macs_per_token``) cannot meet the budget.
        NoTargetsError: no layer is rewritten and the model is not an already-rewritten one.
    """
    config = ctx.config
    requests: list[LayerRequest] = []
    by_fqn = {}
    for cand in ctx.candidates:
        if cand.fqn in ctx.rule_skips:
            ctx.skip(cand, *ctx.rule_skips[cand.fqn])
            continue
        if cand.d_in is None or cand.d_out is None:  # bare parameter that tracing did not resolve
            ctx.skip(cand, *_untraced_reason(ctx))
            continue
        structure, ratio = config.structure, None
        found = override_for(cand.names, config)
        if found is not None:
            rule = found[1]
            structure = rule.structure if rule.structure is not None else structure
            ratio = rule.budget.ratio if rule.budget is not None else None
        requests.append(LayerRequest(cand.fqn, cand.d_in, cand.d_out, structure, ratio))
        by_fqn[cand.fqn] = cand
    for choice in solve(requests, config.budget):
        cand = by_fqn[choice.fqn]
        if choice.spec is None:
            assert choice.skip is not None
            ctx.skip(cand, *choice.skip)
        else:
            ctx.plans[cand.fqn] = Plan(cand, choice.spec, choice.limit)
    if not ctx.plans:
        codes = Counter(d.reason for d in ctx.decisions.values())
        if codes.get("already_structured"):
            ctx.noop = True
        else:
            raise NoTargetsError(_no_targets_message(model, ctx, codes))
    # Keep model order in the report: decisions for planned layers are filled in by the swap passes.
    return PassResult(model, False)


def _untraced_reason(ctx: PassContext) -> tuple[str, str]:
    what = "2-D parameter outside any linear module (forward may use it as F.linear(x, w) or x @ w.T)"
    if ctx.trace_error is not None:
        return "not_traced", f"{what}; torch.export failed, so the graph path could not check it: {ctx.trace_error}"
    if ctx.mode == "module":
        return "not_traced", f"{what}; mode='module' does not trace the model"
    return "needs_example_inputs", f"{what}; pass example_inputs so einrewrite can trace whether forward uses it"


def _no_targets_message(model: nn.Module, ctx: PassContext, codes: Counter[str | None]) -> str:
    cands = ctx.candidates
    head = f"model ({type(model).__name__})"
    if not cands:
        types = sorted({type(m).__name__ for m in model.modules()})[:12]
        return (
            f"{head}: no layer to rewrite: it has no nn.Linear, Conv1D or 2-D parameter (module types: "
            f"{', '.join(types)})"
        )
    kinds = Counter(c.kind for c in cands)
    examples = ", ".join(repr(c.fqn) for c in cands[:4])
    why = ", ".join(f"{k} x{v}" for k, v in codes.most_common())
    hints = []
    if codes.get("not_targeted"):
        suffixes = sorted({c.fqn.rsplit(".", 1)[-1] for c in cands if c.kind in ("Linear", "Conv1D")})[:6]
        hints.append(
            f"target_modules={ctx.config.target_modules!r} matched none of them: use 'all-linear', exact names or "
            f"'.suffix' entries such as {suffixes}, or 're:<regex>'"
        )
    if codes.get("excluded"):
        hints.append(f"exclude_modules={ctx.config.exclude_modules!r} excluded the rest")
    if codes.get("below_min_features"):
        hints.append(f"lower min_features (now {ctx.config.min_features})")
    if codes.get("needs_example_inputs"):
        hints.append("pass example_inputs to trace linear ops on bare parameters")
    if codes.get("dense_cheaper"):
        hints.append("try another structure: for these sizes dense is cheaper")
    hints.append("run `einrewrite inspect MODEL` to list every layer and why it is skipped")
    return (
        f"{head}: no layer was rewritten. It has {len(cands)} linear-like candidates "
        f"({', '.join(f'{k} x{v}' for k, v in kinds.items())}), e.g. {examples}; decisions: {why}. "
        + "; ".join(hints)
    )
