"""ONNX-friendly execution of structured layers: MatMul / Reshape / Transpose chains with pre-arranged weights.

The eager forward (:mod:`einrewrite.contraction`) is tuned for PyTorch, where a strided view is free. In ONNX
every permute becomes a ``Transpose`` node, i.e. a copy, and ONNX Runtime's CPU ``Transpose`` is single-threaded;
a general 3-axis permute can make a lowered layer slower than ORT's own ``Einsum`` (ecosystem-notes §3.2,
Appendix A). The lowering here is built for what ORT actually runs:

* Activations are *feature-major* inside a layer: every intermediate is ``(..., N)`` with the token axis last,
  so the permutes between stages move whole token rows (contiguous chunks of N elements).
* Each stage is one ``MatMul(W, Z)`` whose weight ``W`` is an initializer already in the layout the MatMul
  consumes: ``(batch, [1,] free, contracted)``, no Transpose on any weight.
* A permute that feeds a MatMul directly, and only swaps the leading batch axis with the next one and/or the
  last two axes, is fused by ORT's ``MatmulTransposeFusion`` into ``FusedMatMul(transBatchB, transB)``: the
  MatMul then reads the strided operand in place. For the BTT family (β = δ = 1: monarch, btt, low_rank) both
  the input permute ``(N, γ, α) -> (γ, α, N)`` and the between-stage permute ``(γρ, φ, N) -> (φ, γρ, N)`` are of
  that kind.
* The last stage, where its operand is ``(Bt, K, N)`` or ``(K, N)``, takes the activation as its left operand
  (``StagePlan.tokens_first``): ``(φ, N, γρ) @ (φ, γρ, ε) -> (φ, N, ε)``, the operand read transposed in place.
  One ``Gather`` of ε-element rows then puts the output in token order, ``(N, φε)``: so a BTT layer runs as
  ``FusedMatMul, FusedMatMul, Gather``, and low_rank's ``(N, ρ) @ (ρ, d_out)`` needs no copy at all. Weights
  first, the last stage gives ``(φε, N)``, and its ``Transpose`` to ``(N, φε)`` moves single floats on one
  thread (ORT's CPU Transpose): on the d=1024 benchmark GPT (2-core machine, 2026-12-01; one 1024 -> 4096
  layer at 2048 tokens: Transpose 7.3 ms, its two MatMuls 9.4) the Gather ran the model 7% faster at 2048 tokens
  and at 1, and 4% slower at 64 (per-round medians of interleaved runs, threads not left spinning). The Gather's
  row indices come from the graph's token count, so the optimizer computes them once for every layer.
  Where the next layer reads this output through an activation only, :mod:`einrewrite.handoff` skips the Gather
  and hands ``(φ, N, ε)`` over as the next layer's ``(γ, α, N)``.
* The general θ path (kronecker, tensor_train, any einsum point) runs as the same pairwise MatMuls with the
  contraction order of the eager plan (input meets A or B first, the cheaper by MACs); where β or δ > 1 a stage
  may need an explicit permute, always with the token axis last, and the output its Transpose. No ``Einsum``
  node is ever emitted.

Measured on the 2-core development machine (ORT 1.32 CPU, 2 threads, fp32, 2048 tokens, best of 10 interleaved;
``/tmp`` prototypes built with ``onnx.helper``): btt rank 2 at 1024->4096 ran 3.9x faster than the dense
MatMul (1/10.7 of the MACs) where two ORT ``Einsum`` nodes reached 2.0x. (A token-major variant, a
transposed-A MatMul and a chunked output Transpose, then measured 10-30% slower than weights first at every GPT
shape; those sessions were timed in turn with their threads left spinning, which slowed whichever ran next.)

Axis letters (as in :mod:`einrewrite.spec`): ``n`` tokens; ``a`` α, ``b`` β, ``g`` γ (input factors); ``d`` δ,
``e`` ε, ``f`` φ (output factors); ``r`` ρ (bond). x: (n, g, b, a); A: (g, r, f, d, a); B: (f, e, g, r, b);
y: (n, f, e, d). Axes of size 1 are dropped from every layout.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import moe_lowering
from .layers import EinsumLinear
from .moe import BTTMoELinear
from .moe_lowering import (
    MoEGrouping,
    attach_moe_weights,
    attach_weights,
    attached_weights,
    detach_weights,
    lowered_moe_forward,
    onnx_token_rows,
)
from .spec import EinsumSpec

__all__ = [
    "LoweringPlan",
    "ONNX_TRANSLATIONS",
    "StagePlan",
    "is_lowered_weight",
    "lowered_forward",
    "lowering_plan",
    "onnx_lowering",
]

_X, _A, _B, _Y = "ngba", "grfda", "fegrb", "nfed"  # axis labels of x, A, B, y in memory order
_TOKENS = "n"
_BUFFER_PREFIX = "_onnx_lowered_"


@dataclass(frozen=True)
class Rearrange:
    """Reshape -> permute -> reshape of an activation; ``-1`` marks the one dimension holding the token axis."""

    before: tuple[int, ...] | None  # reshape applied first (None: keep the tensor as it is)
    perm: tuple[int, ...] | None  # permute (None: identity)
    after: tuple[int, ...] | None  # reshape applied last (None: the permuted shape is already the target)

    def apply(self, z: Tensor) -> Tensor:
        """Run the three steps on ``z``."""
        if self.before is not None:
            z = z.reshape(self.before)  # grouped layout, current order
        if self.perm is not None:
            z = z.permute(self.perm)  # target order (a Transpose node in ONNX)
        if self.after is not None:
            z = z.reshape(self.after)  # the MatMul operand's shape
        return z


@dataclass(frozen=True)
class StagePlan:
    """One pairwise contraction ``Z' = W @ rearrange(Z)``.

    Attributes:
        core: which parameter the stage contracts with (``"A"`` or ``"B"``).
        core_perm: permutation of the core's non-trivial axes into (batch, free, contracted) order.
        weight_shape: the pre-arranged weight's shape: ``(Bt, F, K)``, ``(Bt, 1, F, K)`` or ``(F, K)``.
        rearrange: how the activation becomes the MatMul's right operand ``(Bt, [O,] K, I)``.
        labels: the axis labels of the stage's result, in memory order (token axis last).
        outer_product: nothing is contracted (K = 1): the operand gets a unit K axis.
        tokens_first: the activation is the left operand, ``Z' = rearrange(Z)ᵀ @ W`` with ``W`` stored
            ``(Bt, K, F)`` or ``(K, F)``: the result is ``(Bt, N, F)`` or ``(N, F)``, the tokens before the free axes.
    """

    core: str
    core_perm: tuple[int, ...]
    weight_shape: tuple[int, ...]
    rearrange: Rearrange
    labels: str
    outer_product: bool = False
    tokens_first: bool = False


@dataclass(frozen=True)
class LoweringPlan:
    """The static part of a lowered layer: stages, the output rearrangement and the crop."""

    order: str  # "xA" (input meets A first) or "xB"
    stages: tuple[StagePlan, ...]
    output: Rearrange  # result of the last stage -> (N, out_size) or (out_size, N)
    output_feature_major: bool  # output Rearrange yields (out_size, N): crop rows, then transpose
    pad_in: int
    crop_out: int | None  # d_out when the operator's output is padded
    output_rows: bool = False  # the last stage gives (Bt, N, F): one Gather of F-rows puts it in token order

    def describe(self) -> str:
        """One line for reports: the stages' layouts."""
        parts = [f"{s.core}{list(s.weight_shape)} -> ({','.join(s.labels)})" for s in self.stages]
        return f"lowered {self.order}: " + " ; ".join(parts)


@functools.lru_cache(maxsize=1024)
def lowering_plan(spec: EinsumSpec) -> LoweringPlan:
    """The MatMul-chain lowering of a structured (non-dense) ``spec``; cached per spec.

    Raises:
        ValueError: ``spec`` is the dense point (it exports as a plain MatMul/Gemm).

    Examples:
        >>> from einrewrite import structure
        >>> plan = lowering_plan(structure("btt", 1024, 4096, rank=2))
        >>> [s.weight_shape for s in plan.stages]
        [(32, 128, 32), (64, 64, 64)]
    """
    if spec.is_dense:
        raise ValueError(f"{spec.describe()} is dense: it needs no lowering")
    a, b, g, d, e, f, r = spec.sizes
    size = {"a": a, "b": b, "g": g, "d": d, "e": e, "f": f, "r": r}
    live = {k for k, v in size.items() if v > 1}

    def keep(labels: str) -> str:
        return "".join(c for c in labels if c == _TOKENS or c in live)

    macs = spec.macs_by_order
    order = "xA" if macs["xA"] <= macs["xB"] else "xB"
    first, second = ("A", "B") if order == "xA" else ("B", "A")
    cores = {"A": keep(_A), "B": keep(_B)}
    out_labels = keep(_Y)
    z = keep(_X)
    stages = []
    for name, later in ((first, cores[second] + out_labels), (second, out_labels)):
        stage = _plan_stage(z, name, cores[name], later, size)
        stages.append(stage)
        z = stage.labels
    pad_in, crop_out = spec.sizes.in_size - spec.d_in, spec.d_out if spec.sizes.out_size != spec.d_out else None
    target = [out_labels[1:], _TOKENS]  # (φεδ, N): the natural result of a last stage batched over φ
    feature_major = _is_grouping(z, target)
    if feature_major:
        # (Bt, F, K) @ (Bt, K, N) -> (Bt, F, N) leaves a Transpose of the whole output, which ORT runs on one
        # thread; (Bt, N, K) @ (Bt, K, F) -> (Bt, N, F) leaves one Gather of F-rows (on all threads), and
        # (N, K) @ (K, F) -> (N, F) nothing
        flipped = _plan_stage(stages[0].labels, second, cores[second], out_labels, size, tokens_first=True)
        if flipped.tokens_first:
            stages[-1] = flipped
            rows = len(flipped.weight_shape) == 3
            return LoweringPlan(order, tuple(stages), Rearrange(None, None, None), False, pad_in, crop_out, rows)
    output = _rearrange(z, target if feature_major else [_TOKENS, out_labels[1:]], size)
    return LoweringPlan(order, tuple(stages), output, feature_major, pad_in, crop_out)


def _plan_stage(
    z: str, name: str, core: str, later: str, size: dict[str, int], tokens_first: bool = False
) -> StagePlan:
    """Contract activation labels ``z`` with ``core``; labels in ``later`` must survive the stage. With
    ``tokens_first``, the activation is the left operand (:class:`StagePlan`) where its operand is ``(Bt, K, N)``
    or ``(K, N)``: no outer axes, and no other free axis beside the tokens."""
    shared = [c for c in z if c in core]
    batch = [c for c in shared if c in later]  # e.g. γ in stage 1, φ in stage 2 of BTT
    contract = [c for c in shared if c not in later]
    free_x = [c for c in z if c not in core]
    free_w = [c for c in core if c not in z]
    # Free activation axes after the last contracted one stay inner (right of K); the token axis is always
    # inner and last, so every result is feature-major and every permute moves whole token rows.
    last_k = max(z.index(c) for c in contract) if contract else -1
    inner = [c for c in free_x if z.index(c) > last_k and c != _TOKENS] + [_TOKENS]
    outer = [c for c in free_x if c not in inner]
    groups = [g for g in ("".join(batch), "".join(outer), "".join(contract), "".join(inner)) if g]
    rearrange = _rearrange(z, groups, size)
    bt, fw, k = (math.prod(size[c] for c in labels) for labels in (batch, free_w, contract))
    if tokens_first and contract and not outer and inner == [_TOKENS]:
        core_perm = tuple(core.index(c) for c in batch + contract + free_w)
        labels = "".join(batch + [_TOKENS] + free_w)
        return StagePlan(name, core_perm, (bt, k, fw) if batch else (k, fw), rearrange, labels, tokens_first=True)
    core_perm = tuple(core.index(c) for c in batch + free_w + contract)
    if outer:
        weight_shape: tuple[int, ...] = (bt, 1, fw, k) if batch else (fw, k)
    else:
        weight_shape = (bt, fw, k) if batch else (fw, k)
    labels = "".join(batch + outer + free_w + inner)
    return StagePlan(name, core_perm, weight_shape, rearrange, labels, outer_product=not contract)


def _is_grouping(labels: str, groups: list[str]) -> bool:
    """Whether ``labels`` is exactly the concatenation of ``groups`` in that order."""
    return labels == "".join(groups)


def _rearrange(labels: str, groups: list[str], size: dict[str, int]) -> Rearrange:
    """Steps taking a tensor laid out as ``labels`` to the layout ``groups`` (each group one dimension).

    When every group is already contiguous in ``labels``, the tensor is reshaped to the groups in their current
    order and permuted: the permute then feeds the MatMul directly, which ORT can fuse. Otherwise runs of
    labels that stay adjacent are merged, permuted, and the result is reshaped to the groups.
    """

    def dims(parts: list[str]) -> tuple[int, ...]:
        return tuple(-1 if _TOKENS in p else math.prod(size[c] for c in p) for p in parts)

    target = "".join(groups)
    if sorted(target) != sorted(labels):
        raise AssertionError(f"lowering bug: cannot arrange {labels!r} as {groups}")
    if all(g in labels for g in groups):
        current = sorted(groups, key=labels.index)
        perm = tuple(current.index(g) for g in groups)
        return Rearrange(dims(current), None if perm == tuple(range(len(perm))) else perm, None)
    runs: list[str] = []  # maximal runs adjacent in both orders
    for c in target:
        if runs and labels.find(runs[-1][-1] + c) >= 0:
            runs[-1] += c
        else:
            runs.append(c)
    current = sorted(runs, key=labels.index)
    perm = tuple(current.index(run) for run in runs)
    return Rearrange(dims(current), perm, dims(groups))


# ---- execution ------------------------------------------------------------------------------------------
def arranged_weights(layer: EinsumLinear, plan: LoweringPlan | None = None) -> list[Tensor]:
    """The stage weights of ``layer`` in the layout each MatMul consumes (detached, contiguous)."""
    plan = plan or lowering_plan(layer.spec)
    cores = layer.cores()
    out = []
    for stage in plan.stages:
        core = cores[stage.core].detach()
        live = tuple(n for n in core.shape if n > 1)
        w = core.reshape(live).permute(stage.core_perm)  # (batch, free, contracted) axes
        out.append(w.reshape(stage.weight_shape).contiguous())  # e.g. (γ, ρφ, α) or (φ, ε, γρ)
    return out


def lowered_forward(layer: EinsumLinear, x: Tensor) -> Tensor:
    """``layer(x)`` computed with ONNX-friendly torch ops (MatMul / Reshape / Transpose chains).

    Numerically the same operator as the eager forward (same contraction order, fp32 rounding aside). Used while
    exporting (:func:`onnx_lowering`); callable directly for tests. Weights pre-arranged by
    :func:`onnx_lowering` are used when present, otherwise they are arranged here.

    Args:
        layer: a structured or dense :class:`EinsumLinear`.
        x: input of shape (..., in_features).

    Returns:
        (..., out_features), like ``layer(x)``.

    Examples:
        >>> import torch
        >>> from einrewrite import EinsumLinear, structure
        >>> layer = EinsumLinear(structure("btt", 64, 96, rank=2))
        >>> x = torch.randn(3, 5, 64)
        >>> torch.allclose(lowered_forward(layer, x), layer(x), atol=1e-5)
        True
    """
    if x.shape[-1] != layer.in_features:
        raise RuntimeError(
            f"EinsumLinear({layer.spec.describe()}) expects inputs with {layer.in_features} features in the "
            f"last dimension, got shape {tuple(x.shape)}"
        )
    dtype = layer.dtype_of_cores
    if x.dtype != dtype:
        x = x.to(dtype)
    lead = x.shape[:-1]
    if layer.spec.is_dense:
        return F.linear(x, layer.weight, layer.bias)  # (..., d_out): MatMul/Gemm
    plan = lowering_plan(layer.spec)
    weights = attached_weights(layer) or arranged_weights(layer, plan)
    z = _compact(x).reshape(-1, layer.in_features)  # (N, d_in)
    if plan.pad_in:
        z = F.pad(z, (0, plan.pad_in))  # (N, γβα): padded features are zeros
    for stage, w in zip(plan.stages, weights, strict=True):
        z = _compact(stage.rearrange.apply(z))  # (Bt, [O,] K, I): the MatMul's right operand
        if stage.outer_product:
            z = z.unsqueeze(-2)  # (Bt, [O,] 1, I): nothing to contract
        if stage.tokens_first:
            # ([Bt,] N, K)@([Bt,] K, F) -> ([Bt,] N, F); bmm/mm, not matmul, whose broadcasting guards on the token
            # count made torch.export, keeping an example's size of 1 dynamic, bound it to 1 or 2
            z = torch.bmm(z.transpose(1, 2), w) if z.dim() == 3 else torch.mm(z.t(), w)
        else:
            z = torch.matmul(w, z)  # (Bt, [O,] F, I): token axis last
    if plan.output_rows:
        bt, n, f = z.shape
        y = torch.ops.einrewrite.token_order(z, n, bt, f).reshape(-1, bt * f)  # (Bt, N, F) -> (N, Bt, F) -> (N, Bt·F)
    else:
        y = plan.output.apply(z)  # (φεδ, N) or (N, φεδ)
    if plan.output_feature_major:
        if plan.crop_out is not None:
            y = y[: plan.crop_out]  # (d_out, N): crop before the copy
        y = _compact(y.permute(1, 0))  # (N, d_out): the layer's one activation Transpose
    elif plan.crop_out is not None:
        y = y[:, : plan.crop_out]  # (N, d_out)
    y = y.reshape(*lead, layer.out_features)  # (..., d_out)
    if layer.bias is not None:
        # After the reshape, as nn.Linear's bias: ORT then fuses it with what follows (BiasGelu, SkipLayerNorm).
        y = y + layer.bias.to(y.dtype)  # (..., d_out)
    return y


@torch.library.custom_op("einrewrite::token_order", mutates_args=())
def _token_order(z: Tensor, tokens: int, groups: int, width: int) -> Tensor:
    """``(Bt, N, F) -> (N, Bt, F)``, with ``tokens`` = N, ``groups`` = Bt and ``width`` = F for the translation.
    One op for torch.export (index arithmetic traced in torch made it fix a token count of 1 in the example),
    exported by :func:`_onnx_token_order` as one Gather of F-element rows."""
    return z.transpose(0, 1).contiguous()  # (N, Bt, F)


@_token_order.register_fake
def _(z: Tensor, tokens: int, groups: int, width: int) -> Tensor:
    return z.new_empty(tokens, groups, width)  # (N, Bt, F)


def _onnx_token_order(z: Any, tokens: Any, groups: int, width: int) -> Any:
    """ONNX of :func:`_token_order`: row ``j·N + n`` of ``z`` seen as (Bt·N, F) goes to place ``(n, j)``; ORT's
    Gather runs on all threads, its Transpose on one. ``tokens`` is the graph's token count, the same value in
    every layer, so the optimizer computes the row indices once for all of them."""
    from onnxscript import opset18 as op

    position = op.Range(op.Constant(value_int=0), tokens, op.Constant(value_int=1))  # (N,)
    rows = onnx_token_rows(position, groups)  # (N, Bt): n + j·N
    return op.Gather(op.Reshape(z, op.Constant(value_ints=[-1, width])), rows, axis=0)  # (Bt·N, F) -> (N, Bt, F)


ONNX_TRANSLATIONS: dict[Any, Any] = {
    **moe_lowering.ONNX_TRANSLATIONS,
    torch.ops.einrewrite.token_order.default: _onnx_token_order,
}  # the custom ops of every lowered layer -> their onnxscript translations, for the exporter


def _compact(t: Tensor) -> Tensor:
    """``t`` as a fresh contiguous tensor, to reshape without asking whether a view would do.

    On a strided tensor (a slice such as BERT's ``hidden[:, 0]``, a permute) that question is a guard on its
    sizes, and torch.export answers it with the example's sizes: an example batch of one became a graph that only
    takes one. In ONNX a tensor has no strides, and this is no node at all once the graph is optimized.
    """
    return t.clone(memory_format=torch.contiguous_format)


def is_lowered_weight(name: str) -> bool:
    """Whether an exported initializer named ``name`` is a weight :func:`onnx_lowering` attached (e.g.
    ``"h.0.mlp.fc._onnx_lowered_w1"``): already in the layout its MatMul consumes."""
    return _BUFFER_PREFIX in name


def _forward_method(self: EinsumLinear, x: Tensor) -> Tensor:
    return lowered_forward(self, x)


def _moe_forward_method(self: BTTMoELinear, x: Tensor) -> Tensor:
    return lowered_moe_forward(self, x)


@contextlib.contextmanager
def onnx_lowering(model: nn.Module, moe_grouping: MoEGrouping = "auto") -> Iterator[nn.Module]:
    """Make every structured :class:`EinsumLinear` in ``model`` run :func:`lowered_forward` for the duration.

    Pre-arranged weights are attached as temporary buffers, so the exporter writes them as initializers in the
    layout each MatMul consumes; the original parameters are not read by the lowered forward. Everything is
    undone on exit (buffers removed, the class forward restored), also on error. ``BTTMoELinear`` layers run
    :func:`~einrewrite.moe_lowering.lowered_moe_forward` (sparse routing with a deterministic combine, one
    custom op per layer that :data:`~einrewrite.moe_lowering.ONNX_TRANSLATIONS` turns into ONNX) with their
    per-expert weights as buffers; other modules keep their own forward.

    Args:
        model: the module to export; modified in place until the context exits.
        moe_grouping: how BTT-MoE layers group tokens: ``"auto"``, ``"set"`` or ``"expert"``
            (:func:`~einrewrite.moe_lowering.grouped_by_set`).

    Yields:
        ``model``.

    Examples:
        >>> import torch
        >>> from einrewrite import EinsumLinear, structure
        >>> model = torch.nn.Sequential(EinsumLinear(structure("monarch", 64, 64)))
        >>> with onnx_lowering(model):
        ...     program = torch.export.export(model, (torch.randn(4, 64),))  # doctest: +SKIP
    """
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, EinsumLinear) and not module.spec.is_dense and "forward" not in vars(module):
                attach_weights(module, _BUFFER_PREFIX, arranged_weights(module))
                module.forward = types.MethodType(_forward_method, module)  # type: ignore[method-assign]
                patched.append(module)
            elif isinstance(module, BTTMoELinear) and "forward" not in vars(module):
                attach_moe_weights(module, _BUFFER_PREFIX, moe_grouping)
                module.forward = types.MethodType(_moe_forward_method, module)
                patched.append(module)
        yield model
    finally:
        for module in patched:
            detach_weights(module)
            vars(module).pop("forward", None)
