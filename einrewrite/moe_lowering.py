"""BTT-MoE for ONNX Runtime: sparse routing as per-group MatMul chains with a deterministic combine.

ONNX has no grouped GEMM, so a sparse MoE layer runs as a static loop of small MatMuls over token groups picked
by ``NonZero`` and ``Gather``; what separates a fast export from a slow one is the activation traffic around
them (ecosystem-notes §4), which on a 2-core CPU runs at memory bandwidth. Two groupings are exported:

* **By expert set** (:func:`expert_sets`, when there are at most :data:`MAX_EXPERT_SETS` of them, e.g. the
  28 pairs of E=8, k=2; by default only on layers wide enough to gain, :func:`grouped_by_set`, and only from
  :data:`MIN_SET_TOKENS` tokens on, chosen at run time by an ONNX ``If``): tokens are grouped by the *set* of
  experts they picked. Each group's input is gathered once, each of its k experts runs on it as a MatMul pair
  over that expert's own cores, and the k gated outputs are added while they are small. Every token is in
  exactly one group: its output is written once, with no k-sum over the whole batch. The MatMuls read each
  expert's cores as stored: ONNX Runtime holds every expert once. (Stacking a set's k experts into one MatMul
  pair ran the d=1024 benchmark GPT 1-4% faster, but ORT folded the stacks into constants: each expert is in
  C(E-1, k-1) sets, so the session held 7x the experts, 978 MiB against 145 MiB, and 275 MiB for the dense
  model.)
* **By expert** (more sets than that, narrow layers, fewer tokens, or ``moe_grouping="expert"``): each expert
  gathers the (token, slot) pairs routed to it, the results concatenate, one Gather per slot puts them back in
  token order and the k slots are added. This moves k times the activations of the grouping above,
  but its node count grows with E instead of C(E, k).

In both, every expert gates where its activations are narrowest (input γα, intermediate γφ or output φε) and
its second MatMul puts the tokens in the middle, ``(φ, m, ε)``: outputs concatenate along the token axis into
(φ, L, ε), seen as φ·L rows of ε, and one ``Gather`` with (N, φ) row indices (by expert, one per slot, then the k
added) writes them in token order as (N, φ, ε): reordering and transposing in one pass over the output.
The indices are each item's place among the grouped ones (an inverse permutation built by a ``ScatterND`` whose
indices are unique) plus ``j·L`` for row j. (A Gather on the token axis followed by a ``(φ, N, ε) -> (N, φ, ε)``
Transpose moved the output once more: the d=1024 benchmark GPT grouped by set ran 6% slower, 565 against 531 ms
best of 60. By expert, one Gather per slot and Adds ran 3-6% faster than the token-axis Gather, ReduceSum and
Transpose, and a single Gather of (k, N, φ) rows with a ReduceSum over k 14-15% slower.)
No ``ScatterND(add)`` is used: ONNX leaves duplicate indices undefined and ORT's multi-threaded CPU kernel can race
on them (microsoft/onnxruntime#18048), so the exported layer gives the same bits every run.

Measured on the 2-core development machine (ORT 1.32 CPU, 2 threads, fp32, 2048 tokens, random routers, one
process, interleaved best of 30, a noisy day): grouping by expert pair instead of by expert took a 1024->4096
layer from 62 to 57 ms and a 4096->1024 one from 50 to 44 ms.

Each grouping is a custom op (``einrewrite::moe_by_expert_set``, ``einrewrite::moe_by_expert``) with an eager
torch implementation and an ONNX translation written with onnxscript (:data:`ONNX_TRANSLATIONS`, which
:func:`einrewrite.export_onnx` passes to the exporter). ``torch.export`` then sees one op per layer with a
static output shape, instead of tracing every group's data-dependent ``NonZero`` size through fake tensors
(two d=256 BTT-MoE layers: 45 s -> 13 s by expert, 172 s -> 28 s by expert pair); the routing (router, top-k,
gates) stays in torch and exports as usual. The choice by token count is a third op,
``einrewrite::moe_by_token_count``, whose translation records both groupings' nodes as the branches of an ONNX
``If`` (:func:`_onnx_branch`); a ``torch.cond`` over the other two ops exported the same graph, but torch traced
each branch several times: the d=1024 benchmark GPT's BTT-MoE export took 60 s with it and 33 s without.
Unlike the eager sparse path (:mod:`einrewrite.moe`), the weights are per-expert initializers and nothing here
needs autograd. Axis letters as in :mod:`einrewrite.lowering`:
α, γ input factors, φ, ε output factors.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ExportError
from .moe import BTTMoELinear, inverse_permutation, route

__all__ = [
    "MAX_EXPERT_SETS",
    "MIN_SET_TOKENS",
    "MIN_SET_WIDTH",
    "ONNX_TRANSLATIONS",
    "MoEGrouping",
    "attach_moe_weights",
    "attach_weights",
    "attached_weights",
    "check_grouping",
    "chooses_by_token_count",
    "detach_weights",
    "expert_sets",
    "export_weights",
    "grouped_by_set",
    "lowered_moe_forward",
    "numbered_branches",
    "onnx_token_rows",
]

MoEGrouping = Literal["auto", "set", "expert"]
MAX_EXPERT_SETS = 32  # C(E, k) up to this: group tokens by expert set (E=8, k=2: 28 groups of 2 experts)
# "auto" groups by set from this d_in + 2·d_out on: the activation traffic it saves grows with the width and the
# token count, its extra nodes cost a fixed ~0.6 µs each per run. Measured (ORT CPU, 2 threads): a GPT at
# d=1024 ran 2048 tokens faster by set; examples/tiny_gpt (d=64) ran 1, 64 and 512 tokens faster by expert.
MIN_SET_WIDTH = 3072
# ... and only from this many tokens on, chosen when the model runs (an ONNX If on the token count). Measured on
# the d=1024 benchmark GPT (ORT CPU, 2 threads, best of 8, two runs): by set / by expert 52 / 27 and 43 / 29 ms
# at 16 tokens, 136 / 109 and 109 / 88 at 256, 164 / 162 and 150 / 137 at 512, 294 / 312 and 286 / 299 at 1024:
# with few tokens most sets hold one token or none, and their nodes cost more than the traffic they save.
MIN_SET_TOKENS = 1024
_WEIGHTS = "_onnx_lowered_weights"  # attribute listing the buffers a lowered layer reads
_SETS = "_onnx_lowered_sets"  # attribute holding the expert sets (None: by expert) and whether N decides


def expert_sets(num_experts: int, top_k: int) -> list[tuple[int, ...]] | None:
    """The k-subsets of experts a token can pick, when the export groups tokens by them; None when by expert.

    Examples:
        >>> len(expert_sets(8, 2)), expert_sets(8, 2)[:2]
        (28, [(0, 1), (0, 2)])
        >>> expert_sets(16, 2) is None  # 120 groups: one per expert instead
        True
    """
    if math.comb(num_experts, top_k) > MAX_EXPERT_SETS or num_experts > 62:  # 62: the set's bit code fits int64
        return None
    return list(itertools.combinations(range(num_experts), top_k))


def check_grouping(grouping: str) -> None:
    """Raise :class:`~einrewrite.errors.ExportError` unless ``grouping`` is a :data:`MoEGrouping`."""
    if grouping not in ("auto", "set", "expert"):
        raise ExportError(
            f"moe_grouping must be 'auto', 'set' or 'expert', got {grouping!r}: 'set' groups BTT-MoE tokens by "
            "expert set (wide layers, many tokens), 'expert' by expert (narrow layers, decoding)"
        )


def grouped_by_set(layer: BTTMoELinear, grouping: MoEGrouping = "auto") -> list[tuple[int, ...]] | None:
    """The expert sets ``layer`` can export with under ``grouping``, or None when it groups by expert.

    ``"expert"``: always by expert. ``"set"``: by set wherever there are at most :data:`MAX_EXPERT_SETS`.
    ``"auto"``: as ``"set"`` for layers with ``d_in + 2·d_out >= MIN_SET_WIDTH``, by expert for narrower ones,
    where the set grouping's extra nodes cost more than the traffic it saves; a layer with sets then still
    groups by expert at run time when it gets fewer than :data:`MIN_SET_TOKENS` tokens
    (:func:`lowered_moe_forward`).
    """
    check_grouping(grouping)
    if grouping == "expert":
        return None
    if grouping == "auto" and layer.in_features + 2 * layer.out_features < MIN_SET_WIDTH:
        return None
    return expert_sets(layer.num_experts, layer.top_k)


def chooses_by_token_count(layer: BTTMoELinear, grouping: MoEGrouping = "auto") -> bool:
    """Whether ``layer`` exports both groupings under an ``If`` on the token count: ``"auto"`` on a layer that
    can group by set (:func:`grouped_by_set`)."""
    return grouping == "auto" and grouped_by_set(layer, grouping) is not None


def export_weights(layer: BTTMoELinear) -> list[Tensor]:
    """The weights the lowered forward reads (detached, contiguous copies), the same in either grouping.

    Each expert once, in the layout its MatMuls read: ``A_i (γ, φ, α)`` for every expert, then ``B_iᵀ (φ, γ, ε)``.
    """
    a_cores = layer.A.detach().unbind(0)  # A_i (γ, φ, α)
    b_cores = layer.B.detach().transpose(-1, -2).unbind(0)  # B_iᵀ (φ, γ, ε)
    return [w.clone(memory_format=torch.contiguous_format) for w in (*a_cores, *b_cores)]  # not views of A, B


def attach_weights(layer: nn.Module, prefix: str, weights: Sequence[Tensor]) -> None:
    """Register ``weights`` as non-persistent buffers named ``prefix + "w<i>"`` (the exporter then writes them as
    initializers), listed for :func:`attached_weights`; :func:`detach_weights` removes them. Serves every lowered
    layer (:func:`einrewrite.lowering.onnx_lowering`)."""
    names = []
    for i, w in enumerate(weights):
        name = f"{prefix}w{i}"
        layer.register_buffer(name, w, persistent=False)
        names.append(name)
    setattr(layer, _WEIGHTS, names)


def attached_weights(layer: nn.Module) -> list[Tensor] | None:
    """The buffers :func:`attach_weights` registered on ``layer``, in order; None when there are none."""
    names = vars(layer).get(_WEIGHTS)
    return [getattr(layer, n) for n in names] if names else None


def detach_weights(layer: nn.Module) -> None:
    """Undo :func:`attach_weights` (and :func:`attach_moe_weights`)."""
    for name in vars(layer).pop(_WEIGHTS, []):
        delattr(layer, name)
    vars(layer).pop(_SETS, None)


def attach_moe_weights(layer: BTTMoELinear, prefix: str, grouping: MoEGrouping = "auto") -> None:
    """:func:`attach_weights` of :func:`export_weights`, with the expert sets to group by (None: by expert) and
    whether the token count chooses between the groupings (``"auto"``)."""
    attach_weights(layer, prefix, export_weights(layer))
    setattr(layer, _SETS, (grouped_by_set(layer, grouping), chooses_by_token_count(layer, grouping)))


def lowered_moe_forward(layer: BTTMoELinear, x: Tensor, grouping: MoEGrouping = "auto") -> Tensor:
    """A BTT-MoE layer's sparse forward for ONNX Runtime (grouped by expert set or by expert, see the module).

    Weights attached by :func:`attach_moe_weights` are used when present (with the grouping they were attached
    for), otherwise they are arranged here for ``grouping``. Under ``"auto"``, a layer that can group by set
    does so only for at least :data:`MIN_SET_TOKENS` tokens: one op holding both groupings, whose translation
    writes an ONNX ``If`` on the token count (both branches read the same weights), so one export serves
    decoding and large batches.

    Args:
        layer: a :class:`~einrewrite.moe.BTTMoELinear`.
        x: (..., in_features).
        grouping: ``"auto"``, ``"set"`` or ``"expert"`` (:func:`grouped_by_set`).

    Returns:
        (..., out_features), equal to ``layer(x)`` up to fp32 rounding.

    Examples:
        >>> layer = BTTMoELinear(32, 48, num_experts=4, top_k=2)
        >>> x = torch.randn(10, 32)
        >>> torch.allclose(lowered_moe_forward(layer, x), layer(x), atol=1e-5)
        True
    """
    attached = attached_weights(layer)
    if attached:
        weights, (sets, by_tokens) = attached, getattr(layer, _SETS)
    else:
        sets, by_tokens = grouped_by_set(layer, grouping), chooses_by_token_count(layer, grouping)
        weights = export_weights(layer)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)  # (N, d_in)
    if x2.dtype != weights[0].dtype:
        x2 = x2.to(weights[0].dtype)
    index, gates = route(layer.router(x2), layer.top_k)  # (N, k), (N, k) fp32
    gates = gates.to(x2.dtype)
    pad = layer.spec.sizes.in_size - layer.in_features
    xp = F.pad(x2, (0, pad)) if pad else x2  # (N, γα)
    a, _, g, _, e, f, r = layer.spec.sizes
    x3 = xp.reshape(-1, g, a)  # (N, γ, α): reshaped out here, where ORT's Reshape copies nothing
    sizes = [a, g, f, e, r, layer.top_k]
    flat_index, flat_gates = index.reshape(-1), gates.reshape(-1)  # (N·k,) each
    if sets is None:
        out = torch.ops.einrewrite.moe_by_expert(x3, flat_index, flat_gates, weights, sizes)  # (N, φ, ε)
    else:
        bits = torch.tensor([1 << i for i in range(r)], device=index.device)  # (E,) one bit per expert
        code = bits[index].sum(1)  # (N,): the token's expert set as a bit mask (its k ids are distinct)
        table = torch.zeros(index.shape[0], r, dtype=gates.dtype, device=gates.device).scatter(1, index, gates)
        members = [i for s in sets for i in s]  # (sets·k,) flattened
        if by_tokens:  # an ONNX If on the token count, built by the op's translation
            out = torch.ops.einrewrite.moe_by_token_count(
                x3, code, table, flat_index, flat_gates, weights, members, sizes, MIN_SET_TOKENS
            )  # (N, φ, ε)
        else:
            out = torch.ops.einrewrite.moe_by_expert_set(x3, code, table, weights, members, sizes)  # (N, φ, ε)
    out = out.reshape(-1, f * e)  # (N, φε): after the op, where ORT's Reshape copies nothing
    y = out[:, : layer.out_features] if f * e != layer.out_features else out  # (N, d_out)
    y = y.reshape(*lead, layer.out_features)  # (..., d_out)
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


# ---- eager implementations of the two ops ---------------------------------------------------------------------
@torch.library.custom_op("einrewrite::moe_by_expert_set", mutates_args=())
def _moe_by_expert_set(
    x: Tensor, code: Tensor, table: Tensor, weights: list[Tensor], members: list[int], sizes: list[int]
) -> Tensor:
    """Per expert set: its tokens (``code`` equal to the set's bit mask) gathered once from ``x`` (N, γ, α), each
    of its k experts run on them with its gate from ``table`` (N, E), the k outputs added; the outputs back in
    token order: (N, φ, ε)."""
    _, _, f, e, r, k = sizes  # α, γ, φ, ε, r, k
    gate_at = _gate_position(sizes)
    outs, groups = [], []
    for ids, bits in _set_codes(members, k):
        tokens = torch.nonzero(code == bits).reshape(-1)  # (m,) tokens of this set
        xs = x.index_select(0, tokens)  # (m, γ, α)
        gates = table.index_select(0, tokens)  # (m, E)
        ys = [_expert(xs, gates[:, i], weights[i], weights[r + i], gate_at) for i in ids]  # k x (φ, m, ε)
        outs.append(functools.reduce(torch.add, ys))  # (φ, m, ε): the k gated experts summed
        groups.append(tokens)
    ys = torch.cat(outs, dim=1)  # (φ, N, ε) grouped by set
    rows = _token_rows(inverse_permutation(torch.cat(groups)), f)  # (N, φ)
    return ys.reshape(-1, e)[rows]  # (φ·N, ε) -> (N, φ, ε) in token order


@_moe_by_expert_set.register_fake
def _(x: Tensor, code: Tensor, table: Tensor, weights: list[Tensor], members: list[int], sizes: list[int]) -> Tensor:
    return x.new_empty(x.shape[0], sizes[2], sizes[3])  # (N, φ, ε)


@torch.library.custom_op("einrewrite::moe_by_expert", mutates_args=())
def _moe_by_expert(x: Tensor, index: Tensor, gates: Tensor, weights: list[Tensor], sizes: list[int]) -> Tensor:
    """Per expert: the (token, slot) pairs routed to it (``index``, ``gates``: (N·k,) each), their tokens from
    ``x`` (N, γ, α), gated on the narrowest of input, intermediate and output; the k slots summed in token order:
    (N, φ, ε)."""
    _, _, f, e, r, k = sizes  # α, γ, φ, ε, r, k
    n = x.shape[0]
    gate_at = _gate_position(sizes)
    outs, groups = [], []
    for i in range(r):
        pairs = torch.nonzero(index == i).reshape(-1)  # (m,) pairs routed to expert i
        xs = x.index_select(0, torch.div(pairs, k, rounding_mode="floor"))  # (m, γ, α) their tokens
        outs.append(_expert(xs, gates.index_select(0, pairs), weights[i], weights[r + i], gate_at))  # (φ, m, ε)
        groups.append(pairs)
    ys = torch.cat(outs, dim=1)  # (φ, N·k, ε) grouped by expert
    position = inverse_permutation(torch.cat(groups))  # (N·k,) where each (token, slot) pair landed
    rows = _token_rows(position.reshape(n, k), f)  # (N, k, φ)
    return ys.reshape(-1, e)[rows].sum(1)  # (φ·N·k, ε) -> (N, k, φ, ε) -> (N, φ, ε)


@_moe_by_expert.register_fake
def _(x: Tensor, index: Tensor, gates: Tensor, weights: list[Tensor], sizes: list[int]) -> Tensor:
    return x.new_empty(x.shape[0], sizes[2], sizes[3])  # (N, φ, ε)


@torch.library.custom_op("einrewrite::moe_by_token_count", mutates_args=())
def _moe_by_token_count(
    x: Tensor, code: Tensor, table: Tensor, index: Tensor, gates: Tensor, weights: list[Tensor], members: list[int],
    sizes: list[int], min_tokens: int,
) -> Tensor:
    """:func:`_moe_by_expert_set` from ``min_tokens`` tokens on, :func:`_moe_by_expert` below: (N, φ, ε)."""
    if x.shape[0] >= min_tokens:
        return _moe_by_expert_set(x, code, table, weights, members, sizes)
    return _moe_by_expert(x, index, gates, weights, sizes)


@_moe_by_token_count.register_fake
def _(
    x: Tensor, code: Tensor, table: Tensor, index: Tensor, gates: Tensor, weights: list[Tensor], members: list[int],
    sizes: list[int], min_tokens: int,
) -> Tensor:
    return x.new_empty(x.shape[0], sizes[2], sizes[3])  # (N, φ, ε)


def _set_codes(members: Sequence[int], k: int) -> list[tuple[list[int], int]]:
    """Each set's expert ids (from the flattened ``members``) and its bit mask, the value of its tokens' code."""
    sets = [list(members[s : s + k]) for s in range(0, len(members), k)]
    return [(ids, sum(1 << i for i in ids)) for ids in sets]


def _token_rows(position: Tensor, f: int) -> Tensor:
    """Rows of the grouped outputs seen as (φ·L, ε) that hold each item's φ output rows: ``position`` (...,) where
    each item landed among the L grouped ones -> (..., φ), ``position + j·L`` for row j."""
    length = position.numel()
    return position.unsqueeze(-1) + torch.arange(f, device=position.device) * length  # (..., φ)


def _gate_position(sizes: Sequence[int]) -> int:
    """Where an expert's gate applies: 0 input γα, 1 intermediate γφ, 2 output φε, whichever is narrowest."""
    a, g, f, e, _, _ = sizes
    return min((g * a, 0), (g * f, 1), (f * e, 2))[1]


def _expert(xs: Tensor, gate: Tensor, first: Tensor, second: Tensor, gate_at: int) -> Tensor:
    """One expert on its tokens ``xs`` (m, γ, α) with their gates (m,): the gated ``(φ, m, ε)``."""
    m = xs.shape[0]
    if gate_at == 0:
        xs = xs * gate.reshape(m, 1, 1)  # (m, γ, α)
    z = torch.matmul(first, xs.permute(1, 2, 0))  # (γ, φ, α)@(γ, α, m) -> (γ, φ, m)
    if gate_at == 1:
        z = z * gate  # (γ, φ, m)
    y = torch.matmul(z.permute(1, 2, 0), second)  # (φ, m, γ)@(φ, γ, ε) -> (φ, m, ε)
    return y * gate.reshape(1, m, 1) if gate_at == 2 else y  # (φ, m, ε)


# ---- ONNX translations (onnxscript) ---------------------------------------------------------------------------
def _ints(*values: int) -> Any:
    from onnxscript import opset18 as op

    return op.Constant(value_ints=list(values))


def _onnx_inverse(order: Any) -> Any:
    """ONNX of :func:`~einrewrite.moe.inverse_permutation`: ScatterND of 0..L-1 at ``order`` into zeros (indices
    unique, no reduction)."""
    from onnxscript import opset18 as op

    length = op.Shape(order)  # (1,)
    zeros = op.Expand(op.Constant(value_int=0), length)  # (L,)
    positions = op.Range(op.Constant(value_int=0), op.Squeeze(length), op.Constant(value_int=1))  # (L,)
    return op.ScatterND(zeros, op.Unsqueeze(order, _ints(1)), positions)  # (L,)


def onnx_token_rows(position: Any, f: int) -> Any:
    """ONNX of :func:`_token_rows`, for ``position`` (...,) holding each of the L grouped items once: (..., φ)."""
    from onnxscript import opset18 as op

    length = op.Size(position)  # scalar L
    offsets = op.Mul(op.Range(op.Constant(value_int=0), op.Constant(value_int=f), op.Constant(value_int=1)), length)
    return op.Add(op.Unsqueeze(position, _ints(-1)), offsets)  # (..., 1) + (φ,) -> (..., φ)


# The gate's shape per position, against (m, γ, α), (γ, φ, m) or (φ, m, ε), and the tokens' axis in it.
_GATE_SHAPES = {0: ((-1, 1, 1), 0), 1: ((-1,), 0), 2: ((1, -1, 1), 1)}


def _onnx_expert(xs: Any, gate: Any, first: Any, second: Any, gate_at: int) -> Any:
    """ONNX of :func:`_expert`: ``xs`` (m, γ, α), ``gate`` shaped as :data:`_GATE_SHAPES` says; (φ, m, ε)."""
    from onnxscript import opset18 as op

    if gate_at == 0:
        xs = op.Mul(xs, gate)  # (m, γ, α)
    z = op.MatMul(first, op.Transpose(xs, perm=[1, 2, 0]))  # (γ, φ, α)@(γ, α, m) -> (γ, φ, m)
    if gate_at == 1:
        z = op.Mul(z, gate)  # (γ, φ, m)
    y = op.MatMul(op.Transpose(z, perm=[1, 2, 0]), second)  # (φ, m, γ)@(φ, γ, ε) -> (φ, m, ε)
    return op.Mul(y, gate) if gate_at == 2 else y  # (φ, m, ε)


def _onnx_by_expert_set(
    x: Any, code: Any, table: Any, weights: Sequence[Any], members: Sequence[int], sizes: Sequence[int]
) -> Any:
    from onnxscript import opset18 as op

    _, _, f, e, r, k = sizes  # α, γ, φ, ε, r, k
    gate_at = _gate_position(sizes)
    shape, token_axis = _GATE_SHAPES[gate_at]
    by_expert = op.Reshape(op.Transpose(table, perm=[1, 0]), _ints(r, *shape))  # (E, gate shape with N)
    outs, groups = [], []
    for ids, bits in _set_codes(members, k):
        tokens = op.Reshape(op.NonZero(op.Equal(code, op.Constant(value_int=bits))), _ints(-1))  # (m,)
        gates = op.Gather(by_expert, tokens, axis=1 + token_axis)  # (E, gate shape with m)
        xs = op.Gather(x, tokens, axis=0)  # (m, γ, α) gathered once for the k experts
        ys = [
            _onnx_expert(xs, op.Gather(gates, op.Constant(value_int=i), axis=0), weights[i], weights[r + i], gate_at)
            for i in ids
        ]  # k x (φ, m, ε)
        outs.append(functools.reduce(op.Add, ys))  # (φ, m, ε): the k gated experts summed
        groups.append(tokens)
    rows = onnx_token_rows(_onnx_inverse(op.Concat(*groups, axis=0)), f)  # (N, φ)
    return op.Gather(op.Reshape(op.Concat(*outs, axis=1), _ints(-1, e)), rows, axis=0)  # (φ·N, ε) -> (N, φ, ε)


def _onnx_by_expert(x: Any, index: Any, gates: Any, weights: Sequence[Any], sizes: Sequence[int]) -> Any:
    from onnxscript import opset18 as op

    _, _, f, e, r, k = sizes  # α, γ, φ, ε, r, k
    gate_at = _gate_position(sizes)
    gate_shape = _ints(*_GATE_SHAPES[gate_at][0])
    slots = op.Constant(value_int=k)
    outs, groups = [], []
    for i in range(r):
        pairs = op.Reshape(op.NonZero(op.Equal(index, op.Constant(value_int=i))), _ints(-1))  # (m,)
        gate = op.Reshape(op.Gather(gates, pairs, axis=0), gate_shape)  # (m, 1, 1), (m,) or (1, m, 1)
        xs = op.Gather(x, op.Div(pairs, slots), axis=0)  # (m, γ, α): integer division
        outs.append(_onnx_expert(xs, gate, weights[i], weights[r + i], gate_at))  # (φ, m, ε)
        groups.append(pairs)
    rows = onnx_token_rows(op.Reshape(_onnx_inverse(op.Concat(*groups, axis=0)), _ints(-1, k)), f)  # (N, k, φ)
    ys = op.Reshape(op.Concat(*outs, axis=1), _ints(-1, e))  # (φ·N·k, ε)
    slots = [op.Gather(ys, op.Gather(rows, op.Constant(value_int=s), axis=1), axis=0) for s in range(k)]
    return functools.reduce(op.Add, slots)  # k x (N, φ, ε) summed


_branch_ids = itertools.count()


@contextlib.contextmanager
def numbered_branches() -> Iterator[None]:
    """Number the ``If`` branches translated inside from 0, so that two exports of one model in one process write
    the same names (the exporter numbers its own nodes per export)."""
    global _branch_ids
    outer, _branch_ids = _branch_ids, itertools.count()
    try:
        yield
    finally:
        _branch_ids = outer


def _onnx_branch(label: str, build: Callable[[], Any]) -> Any:
    """The nodes ``build()`` records, taken out of the exporter's current op as an ``If`` branch (an onnx_ir
    Graph) with ``build()``'s value as its output. Its values and nodes get names unique in the model: a branch
    may read the outer graph's values, but no name may repeat across the two."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _core

    tracer = _core.current_tracer
    if tracer is None:
        raise ExportError("a BTT-MoE layer's ONNX If can only be built while torch.onnx.export translates it")
    outer, tracer.nodes = tracer.nodes, []
    try:
        out = build()
        nodes = tracer.nodes
    finally:
        tracer.nodes = outer
    tag = f"moe_{label}_{next(_branch_ids)}"
    for i, node in enumerate(nodes):
        node.name = f"{tag}_node{i}"
        for j, value in enumerate(node.outputs):
            value.name = f"{tag}_{i}_{j}"
    return ir.Graph((), [out], nodes=nodes, name=tag)


def _onnx_by_token_count(
    x: Any,
    code: Any,
    table: Any,
    index: Any,
    gates: Any,
    weights: Sequence[Any],
    members: Sequence[int],
    sizes: Sequence[int],
    min_tokens: int,
) -> Any:
    from onnxscript import opset18 as op

    tokens = op.Shape(x, start=0, end=1)  # (1,) N
    wide = op.Squeeze(op.GreaterOrEqual(tokens, _ints(min_tokens)))  # scalar bool
    by_set = _onnx_branch("by_set", lambda: _onnx_by_expert_set(x, code, table, weights, members, sizes))
    by_expert = _onnx_branch("by_expert", lambda: _onnx_by_expert(x, index, gates, weights, sizes))
    return op.If(wide, then_branch=by_set, else_branch=by_expert)  # (N, φ, ε)


ONNX_TRANSLATIONS: dict[Any, Callable[..., Any]] = {
    torch.ops.einrewrite.moe_by_expert_set.default: _onnx_by_expert_set,
    torch.ops.einrewrite.moe_by_expert.default: _onnx_by_expert,
    torch.ops.einrewrite.moe_by_token_count.default: _onnx_by_token_count,
}
