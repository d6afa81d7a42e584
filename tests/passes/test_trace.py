"""torch.export capture and the index of linear ops on parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from einrewrite import TraceError
from einrewrite.passes import export_graph, find_linear_uses

from models import FunctionalModel  # type: ignore[import-not-found]


class _Layouts(nn.Module):
    """Every way research code multiplies by a weight: x @ w, x @ w.t(), transpose(0, 1), addmm, w used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in_out = nn.Parameter(torch.randn(16, 24))  # used as x @ w: dense weight is w.T
        self.w_t = nn.Parameter(torch.randn(24, 16))  # x @ w.t()
        self.w_tr = nn.Parameter(torch.randn(24, 16))  # x @ w.transpose(0, 1)
        self.w_mm = nn.Parameter(torch.randn(16, 24))  # torch.addmm(b, x, w)
        self.b = nn.Parameter(torch.zeros(24))
        self.shared = nn.Parameter(torch.randn(16, 16))  # F.linear twice
        self.table = nn.Parameter(torch.randn(16, 16))  # read as a tensor, not a linear weight

    def forward(self, x: Tensor) -> Tensor:  # x: (B, 16)
        y = x @ self.w_in_out + x @ self.w_t.t() + x @ self.w_tr.transpose(0, 1) + torch.addmm(self.b, x, self.w_mm)
        z = F.linear(F.linear(x, self.shared), self.shared)
        return y.sum(-1) + z.sum(-1) + self.table.sum()


def test_linear_uses_and_layouts() -> None:
    gm = export_graph(_Layouts(), (torch.randn(3, 16),))
    info = find_linear_uses(gm)
    layouts = {fqn: {u.layout for u in uses} for fqn, uses in info.uses.items()}
    assert layouts == {"w_in_out": {"in_out"}, "w_t": {"out_in"}, "w_tr": {"out_in"}, "w_mm": {"in_out"},
                       "shared": {"out_in"}}
    assert len(info.uses["shared"]) == 2
    assert [u.op for u in info.uses["w_mm"]] == ["addmm"] and info.uses["w_mm"][0].bias is not None
    assert "table" not in info.uses and info.others["table"]


def test_nn_module_stack_gives_module_fqns() -> None:
    gm = export_graph(FunctionalModel(), (torch.randn(2, 3, 32),))
    info = find_linear_uses(gm)
    assert {u.module_fqn for u in info.uses["blocks.1.w"]} == {"blocks.1"}
    assert {u.module_fqn for u in info.uses["head.weight"]} == {"head"}
    assert [u.op for u in info.uses["blocks.0.v"]] == ["matmul"] and info.uses["blocks.0.v"][0].layout == "out_in"


def test_export_is_dynamic_in_batch_and_sequence() -> None:
    gm = export_graph(FunctionalModel(), (torch.randn(2, 3, 32),))
    assert gm(torch.randn(5, 7, 32)).shape == (5, 7, 24)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: Tensor) -> Tensor:
        if x.sum().item() > 0:  # data-dependent control flow
            return F.linear(x, self.w)
        return x


def test_export_failure_is_a_trace_error() -> None:
    with pytest.raises(TraceError, match=r"^model \(_Untraceable\): torch.export \(non-strict\) failed"):
        export_graph(_Untraceable(), (torch.ones(2, 8),))
