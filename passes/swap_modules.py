"""The module path: replace each planned ``nn.Linear`` / HF ``Conv1D`` by its structured module, in place.

The model stays an eager ``nn.Module`` (``generate``, training loops and hooks on other modules keep working).
Like torchao's ``quantize_``, the walk replaces a child with ``setattr`` on its parent and never recurses into a
replacement.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .manager import PassContext, PassResult

__all__ = ["dense_weight", "set_submodule", "structured_module", "swap_modules"]


def dense_weight(module: nn.Module, kind: str) -> Tensor:
    """The (d_out, d_in) weight of a Linear, or of a Conv1D (stored (d_in, d_out), so transposed)."""
    weight = module.weight
    return weight.t() if kind == "Conv1D" else weight


def structured_module(
    spec: object, weight: Tensor, bias: Tensor | None, *, init: str, like: nn.Module | None
) -> nn.Module:
    """``spec.build(weight, bias, init=...)`` with the trainability and train/eval mode of the layer it replaces."""
    with torch.no_grad():
        new = spec.build(  # type: ignore[attr-defined]
            weight.detach(), None if bias is None else bias.detach(), init=init
        )
    trainable = weight.requires_grad
    for p in new.parameters():
        p.requires_grad_(trainable)
    if like is not None:
        new.train(like.training)
    return new


def set_submodule(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """``setattr`` the child named by ``fqn`` on its parent (``ModuleList`` indices included)."""
    parent_fqn, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_fqn)
    setattr(parent, name, module)


def swap_modules(model: nn.Module, ctx: PassContext) -> PassResult:
    """Replace every planned module candidate (module path only; the graph path is :func:`replace_linear`)."""
    if ctx.path != "module" or not ctx.plans:
        return PassResult(model, False)
    plans = [p for p in ctx.plans.values() if p.candidate.kind in ("Linear", "Conv1D")]
    bar = tqdm(plans, desc="einrewrite: rewriting", unit="layer", file=sys.stderr, leave=False,
               disable=_disable(ctx, len(plans)))
    for plan in bar:
        cand = plan.candidate
        ctx.current = cand.fqn
        module = model.get_submodule(cand.fqn) if cand.fqn else model
        weight = dense_weight(module, cand.kind)
        new = structured_module(plan.spec, weight, getattr(module, "bias", None), init=ctx.config.init, like=module)
        if cand.fqn:
            set_submodule(model, cand.fqn, new)
        else:  # the model itself is the layer
            model = new
        ctx.replace(plan, new, path="module", layout="in_out" if cand.kind == "Conv1D" else "out_in")
        ctx.done += 1
    return PassResult(model, bool(plans))


def _disable(ctx: PassContext, n: int) -> bool | None:
    """tqdm's ``disable``: forced by ``ctx.progress``, else shown on a terminal for more than a few layers."""
    if ctx.progress is not None:
        return not ctx.progress
    return None if n > 8 else True
