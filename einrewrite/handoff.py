"""Hand a BTT-family layer's output to the next one feature-major, skipping its token-order Gather.

A lowered BTT, Monarch or low_rank layer (:mod:`einrewrite.lowering`) ends in ``Z (φ, N, ε)`` and one ``Gather``
that writes it in token order, ``(N, φε)``; the next such layer starts by reading its input ``(N, γ, α)`` as
``(γ, α, N)``. Between the two, an MLP puts only its bias and activation. Where the next layer's input factors are
the previous layer's output factors (γ = φ, α = ε), the ONNX graph can skip the round trip:

    Z -> Reshape -> Gather -> Reshape* -> Add(b) -> Gelu -> Reshape (N, γ, α) -> Transpose (γ, α, N) -> MatMul
    Z -> Add(b as (φ, 1, ε)) -> Gelu -> Transpose (φ, ε, N) -> MatMul

The Transpose swaps the last two axes in front of a MatMul, which ONNX Runtime folds into ``FusedMatMul``
(transB), so no copy remains. The chain between may hold Reshapes that keep the φε features last, ``Add``,
``Sub``, ``Mul`` and ``Div`` with a constant scalar or a constant per-feature vector (rearranged to (φ, 1, ε)), and
one-input element-wise ops (:data:`ELEMENTWISE`); each of its values must feed only the next. Anything else (two
layers multiplied, as Llama's gated MLP; an activation written out in several ops, as GPT-2's tanh GELU) keeps the
Gather. Measured on the 2-core development machine (2026-12-01, ORT 1.32, 2 threads, fp32, ``/tmp/exp13``): the
d=1024 benchmark GPT's BTT export at 2048 tokens, its four MLPs handed off, ran 6.7% faster than without (per-round
median of 20 interleaved rounds; best 297.3 -> 276.2 ms; 8.6% with the same edit made by hand in an earlier run).
ORT no longer fuses the bias Add into ``BiasGelu`` there, since the bias is no longer a vector; the skipped Gather
outweighs that.

The pass runs on the exporter's ``onnx_ir`` model after onnxscript's optimizer (:func:`einrewrite.export_onnx`;
``optimize=False`` skips it) and returns the pairs it joined, which the export report lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ELEMENTWISE", "hand_off_feature_major"]

ELEMENTWISE = frozenset({
    "Abs", "Celu", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "LeakyRelu", "Mish", "Neg", "Relu",
    "Selu", "Sigmoid", "Softplus", "Softsign", "Tanh",
})  # one input, one output, value by value
_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})  # with a constant scalar or per-feature vector
_TOKEN_ORDER = "token_order"  # the FX name of einrewrite::token_order, the last of a node's name scopes


@dataclass
class _Handoff:
    """One match: the layer's ``Z (φ, N, ε)``, the element-wise nodes between, and the next layer's Transpose."""

    z: Any  # onnx_ir Value
    phi: int
    eps: int
    chain: list[Any]  # element-wise nodes, in order
    removed: list[Any]  # every node the rewrite replaces, in graph order
    transpose: Any  # the next layer's Transpose (N, γ, α) -> (γ, α, N)


def hand_off_feature_major(model: Any) -> list[str]:
    """Rewrite every match in ``model``'s main graph (an ``onnx_ir`` model) in place; ``"producer -> consumer"``
    layer names, one per handoff."""
    graph = model.graph
    joined = []
    rearranged: dict[tuple[str, int, int], Any] = {}  # one (φ, 1, ε) copy per constant: layers may share one
    for gather in [n for n in graph if _is_token_order(n)]:
        match = _match(gather)
        if match is None:
            continue
        _rewrite(graph, match, rearranged)
        joined.append(f"{_layer_of(gather)} -> {_layer_of(match.transpose)}")
    return joined


def _is_token_order(node: Any) -> bool:
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and f"'{_TOKEN_ORDER}" in scopes.split(",")[-1]


def _layer_of(node: Any) -> str:
    """The module path in a node's name scopes, e.g. ``h.0.mlp.c_fc``."""
    scopes = [s.strip(" '[]") for s in node.metadata_props.get("pkg.torch.onnx.name_scopes", "").split(",")]
    return scopes[-2] if len(scopes) >= 2 else node.name


def _only_consumer(value: Any) -> Any | None:
    users = value.consumers()
    if value.is_graph_output() or len(users) != 1:
        return None
    return users[0]


def _const(value: Any) -> np.ndarray | None:
    import onnx_ir

    tensor = onnx_ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _match(gather: Any) -> _Handoff | None:
    rows = gather.inputs[0].producer()  # Reshape (φ·N, ε) of Z
    if rows is None or rows.op_type != "Reshape" or _only_consumer(rows.outputs[0]) is not gather:
        return None
    z = rows.inputs[0]
    producer = z.producer()
    if producer is None or producer.op_type not in ("MatMul", "FusedMatMul") or _only_consumer(z) is not rows:
        return None
    if z.shape is None or len(z.shape) != 3 or not all(isinstance(d, int) for d in (z.shape[0], z.shape[2])):
        return None
    phi, eps = z.shape[0], z.shape[2]
    out = gather.outputs[0].shape  # (N, φ, ε): the token-order Gather of φ·N rows of ε
    if out is None or len(out) != 3 or tuple(out[1:]) != (phi, eps):
        return None
    removed, chain = [rows, gather], []
    value = gather.outputs[0]
    for node in _walk(value):
        if node.op_type == "Reshape" and _reshaped_to(node, phi, eps):  # the next layer's (N, γ, α)
            transpose = _only_consumer(node.outputs[0])
            if transpose is not None and transpose.op_type == "Transpose" and _perm(transpose) == (1, 2, 0):
                return _Handoff(z, phi, eps, chain, [*removed, node, transpose], transpose)
            return None
        if node.op_type == "Reshape" and _keeps_features_last(node, phi * eps):
            removed.append(node)
        elif node.op_type in ELEMENTWISE and len(node.inputs) == 1 or _per_feature(node, phi * eps):
            removed.append(node)
            chain.append(node)
        else:
            return None
    return None


def _walk(value: Any) -> Iterator[Any]:
    """The nodes after ``value`` while each value feeds exactly one node, which takes it as its first or only
    non-constant input."""
    while (node := _only_consumer(value)) is not None and len(node.outputs) == 1:
        yield node
        value = node.outputs[0]


def _perm(node: Any) -> tuple[int, ...] | None:
    attribute = node.attributes.get("perm")
    return None if attribute is None else tuple(attribute.value)


def _reshaped_to(node: Any, phi: int, eps: int) -> bool:
    shape = _const(node.inputs[1])
    return shape is not None and shape.ndim == 1 and len(shape) == 3 and tuple(shape[1:]) == (phi, eps)


def _keeps_features_last(node: Any, features: int) -> bool:
    out = node.outputs[0].shape
    return out is not None and len(out) >= 1 and (
        out[-1] == features or (len(out) >= 2 and isinstance(out[-1], int) and isinstance(out[-2], int)
                                and out[-1] * out[-2] == features)
    )


def _per_feature(node: Any, features: int) -> bool:
    """An Add/Sub/Mul/Div of the chain's value and a constant scalar or (features,) vector."""
    if node.op_type not in _ARITHMETIC or len(node.inputs) != 2:
        return False
    constants = [_const(v) for v in node.inputs]
    if sum(c is not None for c in constants) != 1:
        return False
    constant = next(c for c in constants if c is not None)
    return constant.size == 1 or (constant.size == features and constant.shape[-1] == features)


def _rewrite(graph: Any, match: _Handoff, rearranged: dict[tuple[str, int, int], Any]) -> None:
    import onnx_ir

    value = match.z
    new_nodes = []
    for old in match.chain:
        inputs = []
        for operand in old.inputs:
            constant = _const(operand)
            if constant is None:
                inputs.append(value)  # the chain's value, now (φ, N, ε)
            elif constant.size == 1:
                inputs.append(operand)
            else:
                inputs.append(_feature_major_constant(graph, operand, constant, match, rearranged))
        node = onnx_ir.Node(old.domain, old.op_type, inputs, attributes=list(old.attributes.values()),
                            name=f"{old.name}_feature_major", metadata_props=dict(old.metadata_props))
        new_nodes.append(node)
        value = node.outputs[0]
    transpose = onnx_ir.Node("", "Transpose", [value], attributes=[onnx_ir.AttrInt64s("perm", [0, 2, 1])],
                             name=f"{match.transpose.name}_feature_major",
                             metadata_props=dict(match.transpose.metadata_props))  # (φ, ε, N) = (γ, α, N)
    new_nodes.append(transpose)
    graph.insert_before(match.transpose, new_nodes)
    match.transpose.outputs[0].replace_all_uses_with(transpose.outputs[0])
    transpose.outputs[0].shape = match.transpose.outputs[0].shape
    transpose.outputs[0].type = match.transpose.outputs[0].type
    graph.remove(list(reversed(match.removed)), safe=True)


def _feature_major_constant(
    graph: Any, operand: Any, constant: np.ndarray, match: _Handoff, rearranged: dict[tuple[str, int, int], Any]
) -> Any:
    """``constant`` (φε per-feature values) as a (φ, 1, ε) initializer, broadcast over the tokens; made once per
    operand (the optimizer merges equal initializers, e.g. zero biases, so layers may share one)."""
    import onnx_ir

    key = (operand.name or "", match.phi, match.eps)
    if key not in rearranged:
        taken = set(graph.initializers)
        name = next(n for i in range(len(taken) + 1) if (n := f"{key[0]}_feature_major{i or ''}") not in taken)
        value = onnx_ir.Value(name=name, const_value=onnx_ir.tensor(constant.reshape(match.phi, 1, match.eps)))
        graph.register_initializer(value)
        rearranged[key] = value
    return rearranged[key]
