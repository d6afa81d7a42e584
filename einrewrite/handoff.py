"""Hand a BTT-family layer's output to the next one feature-major, skipping its token-order Gather.

A lowered BTT, Monarch or low_rank layer (:mod:`einrewrite.lowering`) ends in ``Z (φ, N, ε)`` and one ``Gather``
that writes it in token order, ``(N, φε)``; the next such layer starts by reading its input ``(N, γ, α)`` as
``(γ, α, N)``. Between the two, an MLP puts only its bias and activation. Where the next layer's input factors are
the previous layer's output factors (γ = φ, α = ε), the ONNX graph can skip the round trip:

    Z -> Reshape -> Gather -> Reshape* -> Add(b) -> Gelu -> Reshape (N, γ, α) -> Transpose (γ, α, N) -> MatMul
    Z -> Add(b as (φ, 1, ε)) -> Gelu -> Transpose (φ, ε, N) -> MatMul

The Transpose swaps the last two axes in front of a MatMul, which ONNX Runtime folds into ``FusedMatMul``
(transB), so no copy remains. What lies between is an element-wise *region*: the nodes fed by token-order outputs
with the same (φ, ε) and by nothing else but constants, as Reshapes that keep the φε features last, one-input
element-wise ops (:data:`ELEMENTWISE`), and ``Add``, ``Sub``, ``Mul``, ``Div``, ``Pow`` whose other operands are
region values, constant scalars or constant per-feature vectors (rearranged to (φ, 1, ε)). So a Llama MLP,
``down(silu(gate(x)) * up(x))``, hands both ``gate`` and ``up`` to ``down``, and GPT-2's tanh GELU, written out in
eight ops, is a region too. A region whose values reach anything else (a residual, a norm, a graph output) keeps
its Gathers. Measured on the 2-core development machine (2026-12-01, ORT 1.32, 2 threads, fp32, ``/tmp/exp13``):
the d=1024 benchmark GPT's BTT export at 2048 tokens, its four MLPs handed off, ran 6.7% faster than without
(per-round median of 20 interleaved rounds; best 297.3 -> 276.2 ms; 8.6% with the same edit made by hand in an
earlier run), 6.2% at 64 tokens and 2.4% at 1 (200 and 400 rounds). ORT no longer fuses the bias Add into ``BiasGelu`` there, since the bias is no longer a vector; the
skipped Gather outweighs that.

The pass runs on the exporter's ``onnx_ir`` model after onnxscript's optimizer (:func:`einrewrite.export_onnx`;
``optimize=False`` skips it) and returns the pairs it joined, which the export report lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ELEMENTWISE", "hand_off_feature_major"]

ELEMENTWISE = frozenset({
    "Abs", "Cast", "Celu", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log",
    "Mish", "Neg", "Reciprocal", "Relu", "Selu", "Sigmoid", "Softplus", "Softsign", "Sqrt", "Tanh",
})  # one input, one output, value by value
_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})  # region values, constant scalars or per-feature vectors
_TOKEN_ORDER = "token_order"  # the FX name of einrewrite::token_order, the last of a node's name scopes


@dataclass(frozen=True)
class _Source:
    """A layer's ``Z (φ, N, ε)`` and the Reshape and Gather that put it in token order."""

    z: Any  # onnx_ir Value
    rows: Any  # Reshape (φ·N, ε)
    gather: Any
    phi: int
    eps: int


@dataclass
class _Region:
    """Element-wise nodes between token-order outputs and the next layers' input Transposes."""

    phi: int
    eps: int
    sources: dict[Any, _Source] = field(default_factory=dict)  # Gather output value -> its source
    nodes: list[Any] = field(default_factory=list)  # Reshapes and element-wise nodes
    ends: list[tuple[Any, Any]] = field(default_factory=list)  # (Reshape (N, γ, α), Transpose (γ, α, N)) pairs


def hand_off_feature_major(model: Any) -> list[str]:
    """Rewrite every region in ``model``'s main graph (an ``onnx_ir`` model) in place; ``"producer -> consumer"``
    layer names, one per pair joined."""
    graph = model.graph
    joined: list[str] = []
    rearranged: dict[tuple[str, int, int], Any] = {}  # one (φ, 1, ε) copy per constant: layers may share one
    for region in _regions(graph):
        _rewrite(graph, region, rearranged)
        joined += [f"{_layer_of(s.gather)} -> {_layer_of(t)}" for s in region.sources.values()
                   for _, t in region.ends]
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


def _source(gather: Any) -> _Source | None:
    """The layer output behind a token-order Gather, if it is ``MatMul -> Reshape (φ·N, ε) -> Gather (N, φ, ε)``."""
    rows = gather.inputs[0].producer()
    if rows is None or rows.op_type != "Reshape" or _only_consumer(rows.outputs[0]) is not gather:
        return None
    z = rows.inputs[0]
    producer = z.producer()
    if producer is None or producer.op_type not in ("MatMul", "FusedMatMul") or _only_consumer(z) is not rows:
        return None
    if z.shape is None or len(z.shape) != 3 or not all(isinstance(d, int) for d in (z.shape[0], z.shape[2])):
        return None
    out = gather.outputs[0].shape
    if out is None or len(out) != 3 or tuple(out[1:]) != (z.shape[0], z.shape[2]):
        return None
    return _Source(z, rows, gather, z.shape[0], z.shape[2])


def _regions(graph: Any) -> list[_Region]:
    """Every region that can be handed off: nodes that compute from token-order outputs of one (φ, ε) and
    constants only, grouped by the values they share, whose values reach nothing but each other and next layers'
    input Reshapes (:func:`_end`), and at least one of those."""
    factors: dict[Any, tuple[int, int]] = {}  # value computable feature-major -> its (φ, ε)
    owner: dict[Any, Any] = {}  # such a value -> the source Gather or region node computing it
    parent: dict[Any, Any] = {}  # union-find over those nodes
    sources: dict[Any, _Source] = {}

    def root(node: Any) -> Any:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    members = []
    for node in graph:  # in topological order: every operand is seen before its consumers
        source = _source(node) if _is_token_order(node) else None
        if source is not None:
            sources[node] = source
            keys = {(source.phi, source.eps)}
            operands = []
        else:
            operands = _region_operands(node) or []
            if not operands or any(v not in factors for v in operands):
                continue
            keys = {factors[v] for v in operands}
            if len(keys) != 1 or not _fits(node, *next(iter(keys))) or _end(node, *next(iter(keys))) is not None:
                continue  # a next layer's input Reshape ends the region
            members.append(node)
        parent[node] = node
        factors[node.outputs[0]], owner[node.outputs[0]] = next(iter(keys)), node
        for value in operands:
            parent[root(owner[value])] = root(node)
    ends: dict[Any, list[tuple[Any, Any]]] = {}
    escapes = set()
    for value, (phi, eps) in factors.items():
        group = root(owner[value])
        if value.is_graph_output():
            escapes.add(group)
        for user in value.consumers():
            if user in parent:
                continue
            transpose = _end(user, phi, eps)
            if transpose is None:
                escapes.add(group)
            else:
                ends.setdefault(group, []).append((user, transpose))
    regions: dict[Any, _Region] = {}
    for node in [*sources, *members]:
        group = root(node)
        if group in escapes or group not in ends:
            continue
        phi, eps = factors[node.outputs[0]]
        region = regions.setdefault(group, _Region(phi, eps, ends=ends[group]))
        if node in sources:
            region.sources[node.outputs[0]] = sources[node]
        else:
            region.nodes.append(node)
    return list(regions.values())


def _end(node: Any, phi: int, eps: int) -> Any | None:
    """The Transpose if ``node`` is a next layer's input Reshape ``(N, γ, α)`` with (γ, α) = (φ, ε), read as
    ``(γ, α, N)``."""
    if node.op_type != "Reshape":
        return None
    shape = _const(node.inputs[1])
    if shape is None or shape.ndim != 1 or len(shape) != 3 or tuple(shape[1:]) != (phi, eps):
        return None
    transpose = _only_consumer(node.outputs[0])
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != (1, 2, 0):
        return None
    return transpose


def _region_operands(node: Any) -> list[Any] | None:
    """The non-constant operands of ``node`` if it is of a kind a region holds, else None (a Reshape's shape
    does not count)."""
    if len(node.outputs) != 1:
        return None
    if node.op_type == "Reshape":
        return [node.inputs[0]]
    if node.op_type in ELEMENTWISE:
        return list(node.inputs) if len(node.inputs) == 1 else None
    if node.op_type not in _ARITHMETIC or len(node.inputs) != 2:
        return None
    return [value for value in node.inputs if _const(value) is None]


def _fits(node: Any, phi: int, eps: int) -> bool:
    """A Reshape keeps the φε features last; an arithmetic node's constants are scalars or per-feature vectors."""
    features = phi * eps
    if node.op_type == "Reshape":
        return _keeps_features_last(node, features)
    constants = [c for value in node.inputs if (c := _const(value)) is not None]
    return all(c.size == 1 or (c.size == features and c.shape[-1] == features) for c in constants)


def _perm(node: Any) -> tuple[int, ...] | None:
    attribute = node.attributes.get("perm")
    return None if attribute is None else tuple(attribute.value)


def _keeps_features_last(node: Any, features: int) -> bool:
    out = node.outputs[0].shape
    return out is not None and len(out) >= 1 and (
        out[-1] == features or (len(out) >= 2 and isinstance(out[-1], int) and isinstance(out[-2], int)
                                and out[-1] * out[-2] == features)
    )


def _rewrite(graph: Any, region: _Region, rearranged: dict[tuple[str, int, int], Any]) -> None:
    import onnx_ir

    order = {node: i for i, node in enumerate(graph)}
    mapped = {start: source.z for start, source in region.sources.items()}  # token order -> (φ, N, ε)
    for old in sorted(region.nodes, key=order.__getitem__):
        if old.op_type == "Reshape":  # (φ, N, ε) needs none
            mapped[old.outputs[0]] = mapped[old.inputs[0]]
            continue
        inputs = []
        for operand in old.inputs:
            constant = None if operand in mapped else _const(operand)
            if constant is None:
                inputs.append(mapped[operand])
            elif constant.size == 1:
                inputs.append(operand)
            else:
                inputs.append(_feature_major_constant(graph, operand, constant, region, rearranged))
        node = onnx_ir.Node(old.domain, old.op_type, inputs, attributes=list(old.attributes.values()),
                            name=f"{old.name}_feature_major", metadata_props=dict(old.metadata_props))
        graph.insert_before(old, node)  # where its operands are computed: Llama's up(x) may come after silu(gate)
        mapped[old.outputs[0]] = node.outputs[0]
    removed = [s.rows for s in region.sources.values()] + [s.gather for s in region.sources.values()]
    for reshape, transpose in region.ends:
        handed = onnx_ir.Node("", "Transpose", [mapped[reshape.inputs[0]]],
                              attributes=[onnx_ir.AttrInt64s("perm", [0, 2, 1])], name=f"{transpose.name}_feature_major",
                              metadata_props=dict(transpose.metadata_props))  # (φ, ε, N) = (γ, α, N)
        graph.insert_before(transpose, handed)
        handed.outputs[0].shape, handed.outputs[0].type = transpose.outputs[0].shape, transpose.outputs[0].type
        transpose.outputs[0].replace_all_uses_with(handed.outputs[0])
        removed += [reshape, transpose]
    removed += region.nodes
    graph.remove(sorted(removed, key=order.__getitem__, reverse=True), safe=True)


def _feature_major_constant(
    graph: Any, operand: Any, constant: np.ndarray, region: _Region, rearranged: dict[tuple[str, int, int], Any]
) -> Any:
    """``constant`` (φε per-feature values) as a (φ, 1, ε) initializer, broadcast over the tokens; made once per
    operand (the optimizer merges equal initializers, e.g. zero biases, so layers may share one)."""
    import onnx_ir

    key = (operand.name or "", region.phi, region.eps)
    if key not in rearranged:
        taken = set(graph.initializers)
        name = next(n for i in range(len(taken) + 1) if (n := f"{key[0]}_feature_major{i or ''}") not in taken)
        value = onnx_ir.Value(name=name, const_value=onnx_ir.tensor(constant.reshape(region.phi, 1, region.eps)))
        graph.register_initializer(value)
        rearranged[key] = value
    return rearranged[key]
