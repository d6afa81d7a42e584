"""The ``ensures`` step: the rewritten model runs, keeps its output shapes and dtypes, and uses every new layer.

Liveness: an output must change when a replaced layer's factors change. One backward pass of a random projection
of the outputs clears every layer whose factors get a gradient; the remaining suspects are perturbed one by one
and the model run again. A layer that changes nothing is bypassed (a parent read ``.weight`` directly, a fused
kernel, an unused branch) and the rewrite is an error, not a success (PEFT #2556, ModelOpt's silent no-op check).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..errors import EinrewriteError
from .manager import PassContext, PassResult
from .swap_modules import _disable

__all__ = ["BypassedLayerError", "VerificationError", "check_liveness", "output_tensors", "run_model", "verify_rewrite"]


class VerificationError(EinrewriteError, RuntimeError):
    """The rewritten model fails on the example inputs or changes its output shapes or dtypes."""


class BypassedLayerError(VerificationError):
    """A replaced layer is not on the forward path: changing it does not change the output."""


def output_tensors(out: Any) -> list[Tensor]:
    """The tensors of a model output (tensors, tuples, dicts, Hugging Face ``ModelOutput``), in order."""
    if hasattr(out, "to_tuple") and callable(out.to_tuple):
        out = out.to_tuple()
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, Tensor)]


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """``eval()`` and ``no_grad`` for the duration, restoring every module's train flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def run_model(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """Run ``model(*args, **kwargs)`` in inference mode; returns the output tensors."""
    with inference_mode(model):
        return output_tensors(model(*args, **kwargs))


def _changed(a: list[Tensor], b: list[Tensor]) -> bool:
    return any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _perturb(module: nn.Module, generator: torch.Generator) -> list[tuple[nn.Parameter, Tensor]]:
    """Add noise to every factor of ``module`` (not its bias); returns what to restore."""
    saved = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" or not p.is_floating_point():
                continue
            saved.append((p, p.detach().clone()))
            noise = torch.randn(p.shape, generator=generator).to(dtype=p.dtype, device=p.device)
            p.add_(noise * (p.detach().abs().max() + 1.0))
    return saved


def _factors(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] != "bias" and p.is_floating_point()]


def _suspects_by_gradient(
    model: nn.Module, fqns: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[str]:
    """Layers whose factors get no gradient from a random projection of the outputs (one forward + backward).

    A nonzero gradient proves the output depends on the layer; a zero or missing one only makes it a suspect, to
    be confirmed by perturbation. Other parameters are frozen meanwhile so no gradient is computed for them.
    """
    factors = {fqn: _factors(model.get_submodule(fqn)) for fqn in fqns}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        for ps in factors.values():
            for p in ps:
                p.requires_grad_(True)
        for m, _ in modes:
            m.training = False
        with torch.enable_grad():
            outs = [t for t in output_tensors(model(*args, **kwargs)) if t.is_floating_point() and t.requires_grad]
            if not outs:
                return list(fqns)
            generator = torch.Generator().manual_seed(0)
            # random weights: a plain sum can cancel (softmax rows sum to 1 whatever the layer does)
            loss = sum((t.float() * torch.randn(t.shape, generator=generator).to(t.device)).sum() for t in outs)
            flat = [p for ps in factors.values() for p in ps]
            grads = torch.autograd.grad(loss, flat, allow_unused=True)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
    by_param = {id(p): g for p, g in zip(flat, grads, strict=True)}
    suspects = []
    for fqn, ps in factors.items():
        live = any(
            (g := by_param[id(p)]) is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for p in ps
        )
        if not live:
            suspects.append(fqn)
    return suspects


def check_liveness(
    model: nn.Module,
    fqns: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    baseline: list[Tensor] | None = None,
    disable_progress: bool | None = True,
) -> list[str]:
    """The FQNs among ``fqns`` whose factors do not affect the model's output (bypassed layers).

    One backward pass clears every layer whose factors receive a gradient; each remaining suspect is perturbed
    (noise on its factors, the model run again, the factors restored) and is bypassed if no output changes.
    """
    try:
        suspects = _suspects_by_gradient(model, fqns, args, kwargs)
    except RuntimeError:  # a model that cannot be differentiated: perturb every layer
        suspects = list(fqns)
    if not suspects:
        return []
    if baseline is None:
        baseline = run_model(model, args, kwargs)
    generator = torch.Generator().manual_seed(0)
    dead = []
    with inference_mode(model):
        for fqn in tqdm(suspects, desc="einrewrite: liveness", unit="layer", file=sys.stderr, leave=False,
                        disable=disable_progress):
            module = model.get_submodule(fqn)
            saved = _perturb(module, generator)
            try:
                out = output_tensors(model(*args, **kwargs))
            finally:
                with torch.no_grad():
                    for p, value in saved:
                        p.copy_(value)
            if not _changed(baseline, out):
                dead.append(fqn)
    return dead


def verify_rewrite(model: nn.Module, ctx: PassContext) -> PassResult:
    """Check the rewritten model on the example inputs; see the module docstring.

    Raises:
        VerificationError: the model fails, or its outputs change shape or dtype.
        BypassedLayerError: a replaced layer does not affect the output.
    """
    replaced = [d.fqn for d in ctx.decisions.values() if d.replaced]
    if not ctx.verify or not replaced:
        return PassResult(model, False)
    if not ctx.has_inputs:
        ctx.notes.append(
            "liveness not checked: no example_inputs (pass them to confirm every replaced layer is on the forward path)"
        )
        return PassResult(model, False)
    args, kwargs = ctx.args or (), ctx.kwargs
    try:
        out = run_model(model, args, kwargs)
    except Exception as e:
        if isinstance(e, AttributeError) and "weight" in str(e):
            raise BypassedLayerError(
                f"{replaced[0] if len(replaced) == 1 else 'model'}: the rewritten model reads .weight of a replaced "
                f"layer directly ({e}); the swap would be bypassed: exclude the layer its parent reads"
            ) from e
        raise VerificationError(
            f"model ({type(model).__name__}): the rewritten model fails on the example inputs: {type(e).__name__}: {e}"
        ) from e
    if ctx.reference is not None:
        _check_parity(ctx.reference, out)
        ctx.output_error = _deviation(ctx.reference, out)
    dead = check_liveness(model, replaced, args, kwargs, baseline=out, disable_progress=_disable(ctx, len(replaced)))
    if dead:
        raise BypassedLayerError(
            f"{dead[0]}: the model's output does not change when this replaced layer changes, so forward bypasses "
            f"it{' (also: ' + ', '.join(dead[1:]) + ')' if len(dead) > 1 else ''}; its parent may read .weight "
            f"directly or never call it on these inputs: exclude it (exclude_modules=[{dead[0]!r}]) or check the "
            "example inputs reach it"
        )
    ctx.verified = True
    return PassResult(model, False)


def _check_parity(reference: list[Tensor], out: list[Tensor]) -> None:
    if len(reference) != len(out):
        raise VerificationError(
            f"model: the rewritten model returns {len(out)} tensors where the original returned {len(reference)}"
        )
    for i, (a, b) in enumerate(zip(reference, out, strict=True)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise VerificationError(
                f"model: output {i} changed from {tuple(a.shape)} {a.dtype} to {tuple(b.shape)} {b.dtype} after the "
                "rewrite; this is a bug in einrewrite, please report it"
            )


def _deviation(reference: list[Tensor], out: list[Tensor]) -> float | None:
    worst = None
    for a, b in zip(reference, out, strict=True):
        if not a.is_floating_point() or a.numel() == 0:
            continue
        scale = float(a.detach().abs().max()) or 1.0
        err = float((a.detach().float() - b.detach().float()).abs().max()) / scale
        worst = err if worst is None else max(worst, err)
    return worst
