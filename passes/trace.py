"""The graph path's capture: `torch.export` (non-strict) and the index of linear ops on parameters.

``torch.fx.symbolic_trace`` fails on current Hugging Face models; ``torch.export.export(strict=False)`` works
(ecosystem notes §2). ``ep.module()`` is an FX ``GraphModule`` whose parameters keep their FQNs, and every node
carries ``meta["nn_module_stack"]``, so targeting rules see the same names on both paths.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .manager import PassContext, PassResult

__all__ = ["GraphInfo", "LinearUse", "export_graph", "find_linear_uses", "trace_model"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
# op -> (index of the activation, index of the weight); y = x W^T for linear, y = x W otherwise.
_LINEAR_OPS: dict[Any, tuple[str, int, int]] = {
    aten.linear.default: ("linear", 0, 1),
    aten.matmul.default: ("matmul", 0, 1),
    aten.mm.default: ("mm", 0, 1),
    aten.addmm.default: ("addmm", 1, 2),
}


@dataclass
class LinearUse:
    """One op that multiplies activations by a parameter matrix.

    Attributes:
        node: the op node (``aten.linear`` / ``matmul`` / ``mm`` / ``addmm``).
        op: its short name.
        x: the activation operand.
        weight_fqn: FQN of the parameter.
        layout: ``"out_in"`` when the dense weight W (y = x Wᵀ) is the parameter itself, ``"in_out"`` when it is
            the parameter transposed (``x @ w``, Conv1D's ``addmm``).
        chain: transpose nodes between the parameter and the op.
        bias: the bias operand (``linear``'s third argument, ``addmm``'s first), or None.
        module_fqn: the module the op ran in (``nn_module_stack``).
    """

    node: fx.Node
    op: str
    x: fx.Node
    weight_fqn: str
    layout: str
    chain: list[fx.Node]
    bias: Any
    module_fqn: str

    def live_operands(self) -> tuple[Any, Any]:
        """(activation, bias) as the node's arguments are now (surgery on earlier nodes rewires them)."""
        args, kwargs = self.node.args, self.node.kwargs
        if self.op == "addmm":
            return args[1], args[0]
        if self.op == "linear":
            return args[0], args[2] if len(args) > 2 else kwargs.get("bias")
        return args[0], None


@dataclass
class GraphInfo:
    """A traced model: the ``GraphModule`` and, per parameter FQN, its linear uses and any other uses."""

    gm: fx.GraphModule
    uses: dict[str, list[LinearUse]] = field(default_factory=dict)
    others: dict[str, list[str]] = field(default_factory=dict)


def _dynamic_spec(args: Sequence[Any], kwargs: dict[str, Any], model: nn.Module) -> Any:
    """Every tensor dimension ``Dim.AUTO`` (dynamic where export can keep it so), in ``dynamic_shapes`` form."""
    auto = torch.export.Dim.AUTO

    def spec(value: Any) -> Any:
        return pytree.tree_map(
            lambda v: {i: auto for i in range(v.ndim)} if isinstance(v, torch.Tensor) else None, value
        )

    if not kwargs:
        return tuple(spec(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def export_graph(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> fx.GraphModule:
    """``torch.export.export(model, args, kwargs, strict=False).module()``, in eval mode.

    Dimensions are exported dynamic where possible (``Dim.AUTO``), so the graph accepts other batch and sequence
    sizes; when that fails the export is retried with static shapes. Dropout and other train/eval behaviour is
    captured in eval mode: the result is for inference.

    Raises:
        TraceError: torch.export could not capture the model.
    """
    kwargs = dict(kwargs or {})
    was_training = model.training
    model.eval()
    try:
        try:
            ep = torch.export.export(
                model, tuple(args), kwargs, strict=False, dynamic_shapes=_dynamic_spec(args, kwargs, model)
            )
        except Exception as e:  # noqa: BLE001 - dynamic export is best effort; static is the real attempt
            logger.info("dynamic-shape export failed (%s: %s); retrying with static shapes", type(e).__name__, e)
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TraceError(
            f"model ({type(model).__name__}): torch.export (non-strict) failed: {type(e).__name__}: {first[:300]}; "
            "fix the model for torch.export, or use mode='module' (module swap only) and exclude the bare parameters"
        ) from e
    finally:
        model.train(was_training)
    return ep.module()  # type: ignore[return-value]


def _is_transpose(node: fx.Node, src: fx.Node) -> bool:
    """A 2-D transpose of ``src`` (``.T``, ``.t()``, ``transpose(0, 1)``, ``permute(1, 0)``)."""
    if node.op != "call_function" or not node.args or node.args[0] is not src:
        return False
    target = node.target
    if target in (aten.t.default, aten.numpy_T.default, getattr(aten, "mT", None), getattr(aten, "adjoint", None)):
        return True
    if target is aten.transpose.int and len(node.args) == 3:
        return {int(node.args[1]) % 2, int(node.args[2]) % 2} == {0, 1}
    if target is aten.permute.default and len(node.args) == 2:
        return [int(d) % 2 for d in node.args[1]] == [1, 0]
    return False


def _module_fqn(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path)


def _resolve_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_linear_uses(gm: fx.GraphModule) -> GraphInfo:
    """Index every 2-D parameter by how the graph uses it: as a linear weight, or otherwise."""
    info = GraphInfo(gm)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _resolve_attr(gm, node.target)
        if not isinstance(value, nn.Parameter) or value.ndim != 2:
            continue
        stack: list[tuple[fx.Node, list[fx.Node]]] = [(node, [])]
        while stack:
            src, chain = stack.pop()
            for user in list(src.users):
                if _is_transpose(user, src):
                    stack.append((user, [*chain, user]))
                    continue
                use = _as_linear_use(user, src, node.target, chain)
                if use is not None:
                    info.uses.setdefault(node.target, []).append(use)
                else:
                    info.others.setdefault(node.target, []).append(str(user.target))
    return info


def _as_linear_use(user: fx.Node, src: fx.Node, fqn: str, chain: list[fx.Node]) -> LinearUse | None:
    entry = _LINEAR_OPS.get(user.target) if user.op == "call_function" else None
    if entry is None:
        return None
    op, xi, wi = entry
    if len(user.args) <= wi or user.args[wi] is not src or any(a is src for i, a in enumerate(user.args) if i != wi):
        return None
    if op == "addmm" and any(user.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return None
    x = user.args[xi]
    if not isinstance(x, fx.Node):
        return None
    bias: Any = None
    if op == "linear":
        bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
    elif op == "addmm":
        bias = user.args[0]
    flipped = len(chain) % 2 == 1
    layout = "out_in" if (op == "linear") != flipped else "in_out"
    return LinearUse(user, op, x, fqn, layout, chain, bias, _module_fqn(user))


def trace_model(model: nn.Module, ctx: PassContext) -> PassResult:
    """Export the model when the graph path is needed, and resolve bare 2-D parameters into linear layers.

    The graph path is taken in mode ``"graph"``, or in mode ``"auto"`` when a targeted bare parameter turns out
    to be multiplied with activations in forward (``F.linear(x, self.w)``, ``x @ self.w.T``). Otherwise the
    model stays eager and this pass changes nothing.

    Raises:
        TraceError: mode ``"graph"`` without example inputs, or export failed in mode ``"graph"``.
    """
    loose = [c for c in ctx.candidates if c.kind == "param" and c.fqn not in ctx.rule_skips]
    if ctx.mode == "module" or (ctx.mode == "auto" and not loose):
        return PassResult(model, False)
    if not ctx.has_inputs:
        if ctx.mode == "graph":
            raise TraceError(
                f"model ({type(model).__name__}): mode='graph' needs example_inputs to run torch.export; pass "
                "example_inputs=(tensor, ...) or use mode='auto'"
            )
        return PassResult(model, False)
    try:
        gm = export_graph(model, ctx.args or (), ctx.kwargs)
    except TraceError as e:
        if ctx.mode == "graph":
            raise
        ctx.trace_error = str(e)
        ctx.notes.append(f"graph path unavailable, kept the module path: {e}")
        return PassResult(model, False)
    info = find_linear_uses(gm)
    kept = []
    any_linear = False
    for cand in ctx.candidates:
        if cand.kind != "param":
            kept.append(cand)
            continue
        uses = info.uses.get(cand.fqn, [])
        if not uses:
            continue  # never multiplied with activations: not a linear layer
        layouts = {u.layout for u in uses}
        rows, cols = cand.shape
        d_out, d_in = (rows, cols) if layouts == {"out_in"} else (cols, rows)
        cand.d_in, cand.d_out = d_in, d_out
        cand.has_bias = any(u.bias is not None for u in uses)
        cand.names = tuple(dict.fromkeys((*cand.names, *(u.module_fqn for u in uses if u.module_fqn))))
        kept.append(cand)
        if cand.fqn in ctx.rule_skips:
            continue
        if len(layouts) > 1 or info.others.get(cand.fqn):
            other = sorted(set(info.others.get(cand.fqn, []))) or ["x @ w and x @ w.T"]
            ctx.rule_skips[cand.fqn] = (
                "read_directly",
                f"the weight is also used outside a linear op ({', '.join(other)}); it cannot be replaced",
            )
            continue
        any_linear = True
    ctx.candidates = kept
    if ctx.mode == "auto" and not any_linear:
        ctx.notes.append("traced the model: no bare parameter is used as a linear weight; kept the module path")
        return PassResult(model, False)
    for cand in ctx.candidates:
        if cand.kind not in ("Linear", "Conv1D") or cand.fqn in ctx.rule_skips:
            continue
        wfqn = cand.weight_fqn or ""
        if not info.uses.get(wfqn):
            ctx.rule_skips[cand.fqn] = (
                "not_on_forward_path",
                "not called in the traced forward; on the graph path only layers the example inputs reach are "
                "rewritten",
            )
        elif info.others.get(wfqn):
            ctx.rule_skips[cand.fqn] = (
                "read_directly",
                f"the weight is also read outside the layer's linear op ({', '.join(sorted(set(info.others[wfqn])))})",
            )
    ctx.graph = info
    ctx.path = "graph"
    ctx.notes.append(
        "graph path: the result is a torch.fx GraphModule from torch.export, traced in eval mode; call it with "
        "the same argument structure as the example inputs"
    )
    return PassResult(gm, True)
