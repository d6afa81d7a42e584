"""The graph path: node surgery on the exported ``GraphModule``.

Each planned weight's linear ops (``aten.linear``, ``matmul``, ``mm``, ``addmm`` on the parameter, through any
transposes) become ``call_module`` nodes of one structured submodule, installed under the layer's FQN (the
``nn.Linear``'s path, or the bare parameter's path), so ``state_dict`` keys read like the eager model's.
``subgraph_rewriter`` cannot add parameters, hence direct surgery (ecosystem notes §1.5).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..targets import Candidate
from .manager import PassContext, PassResult
from .swap_modules import _disable, structured_module
from .trace import GraphInfo, LinearUse, _resolve_attr

__all__ = ["apply_graph_plan", "replace_linear"]

aten = torch.ops.aten


def replace_linear(model: nn.Module, ctx: PassContext) -> PassResult:
    """Replace every planned layer's linear ops in the traced graph (graph path only)."""
    if ctx.path != "graph" or not ctx.plans:
        return PassResult(model, False)
    info: GraphInfo = ctx.graph
    gm = info.gm
    plans = list(ctx.plans.values())
    bar = tqdm(plans, desc="einrewrite: rewriting", unit="layer", file=sys.stderr, leave=False,
               disable=_disable(ctx, len(plans)))
    for plan in bar:
        ctx.current = plan.candidate.fqn
        new, layout = apply_graph_plan(gm, info, plan.candidate, plan.spec, init=ctx.config.init)
        ctx.replace(plan, new, path="graph", layout=layout)
        ctx.done += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)


def apply_graph_plan(
    gm: fx.GraphModule, info: GraphInfo, cand: Candidate, spec: Any, *, init: str
) -> tuple[nn.Module, str]:
    """Build the structured module for ``cand`` from its parameter in ``gm`` and rewire its uses to it.

    Returns:
        The new module and the layout of the dense weight it replaced (``"out_in"`` or ``"in_out"``).
    """
    wfqn = cand.weight_fqn or cand.fqn
    uses: list[LinearUse] = info.uses[wfqn]
    param = _resolve_attr(gm, wfqn)
    layout = uses[0].layout
    weight = param if layout == "out_in" else param.t()  # (d_out, d_in)
    bias_nodes = {id(u.bias): u.bias for u in uses}
    shared_bias = next(iter(bias_nodes.values())) if len(bias_nodes) == 1 else None
    bias = None
    if isinstance(shared_bias, fx.Node) and shared_bias.op == "get_attr":
        value = _resolve_attr(gm, shared_bias.target)
        if isinstance(value, torch.Tensor) and value.ndim == 1 and value.shape[0] == spec.d_out:
            bias = value
    absorbed = bias is not None
    new = structured_module(spec, weight, bias, init=init, like=None)
    new.train(False)
    graph = gm.graph
    op_nodes = {id(u.node) for u in uses}
    leaving = {wfqn}
    if absorbed and all(id(user) in op_nodes for user in shared_bias.users):
        leaving.add(shared_bias.target)
    path = cand.fqn
    staying = [
        n.target for n in graph.nodes
        if n.op in ("get_attr", "call_module") and n.target not in leaving
        and (n.target == path or str(n.target).startswith(path + "."))
    ]
    if staying:  # the old holder is still read (e.g. a bias used elsewhere): keep it, install beside it
        path = f"{path}_structured"
    _install(gm, path, new)
    dead: list[fx.Node] = []
    for use in uses:
        x, bias_now = use.live_operands()  # earlier replacements may have rewired them
        with graph.inserting_before(use.node):
            out = graph.call_module(path, (x,))
            out.meta = dict(use.node.meta)
            if not absorbed and bias_now is not None:
                out = graph.call_function(aten.add.Tensor, (out, bias_now))
                out.meta = dict(use.node.meta)
        use.node.replace_all_uses_with(out)
        graph.erase_node(use.node)
        dead.extend(reversed(use.chain))
    attrs = [n for n in graph.nodes if n.op == "get_attr" and n.target in leaving]
    for node in dict.fromkeys([*dead, *attrs]):
        if not getattr(node, "_erased", False) and not node.users:
            graph.erase_node(node)
    return new, layout


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, replacing what is there (the old holder module or the bare parameter)."""
    parent_fqn, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_fqn)
    if name in parent._parameters:
        del parent._parameters[name]
    elif name in parent._modules:
        del parent._modules[name]
    elif name in parent._buffers:
        del parent._buffers[name]
    parent.add_module(name, module)
