"""The liveness check: a swapped layer the forward pass bypasses is an error, not a success."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import einrewrite as er
from einrewrite import BypassedLayerError, RewriteConfig


class _ReadsWeight(nn.Module):
    """A parent that reads its child's .weight instead of calling it (PEFT #2556)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.proj.weight, self.proj.bias)


class _DeadBranch(nn.Module):
    """A layer that runs but whose result is thrown away, next to one that matters."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(64, 64)
        self.unused = nn.Linear(64, 64)

    def forward(self, x: Tensor) -> Tensor:
        _ = self.unused(x)
        return self.used(x)


def test_parent_reading_weight_directly_is_an_error() -> None:
    with pytest.raises(BypassedLayerError, match=r"^proj: the rewritten model reads .weight of a replaced layer"):
        er.rewrite(_ReadsWeight(), RewriteConfig(), torch.randn(2, 64), mode="module")


def test_a_layer_whose_output_is_unused_is_an_error_naming_it() -> None:
    with pytest.raises(BypassedLayerError, match=r"^unused: the model's output does not change when this replaced "
                       r"layer changes.*exclude_modules=\['unused'\]"):
        er.rewrite(_DeadBranch(), RewriteConfig(), torch.randn(2, 64))
    _, report = er.rewrite(_DeadBranch(), RewriteConfig(exclude_modules=["unused"]), torch.randn(2, 64))
    assert report.verified and report["unused"].reason == "excluded"


def test_verify_can_be_turned_off() -> None:
    _, report = er.rewrite(_DeadBranch(), RewriteConfig(), torch.randn(2, 64), verify=False)
    assert report.verified is None and len(report.replaced) == 2


def test_graph_path_sees_through_direct_weight_reads() -> None:
    new, report = er.rewrite(_ReadsWeight(), RewriteConfig(), torch.randn(2, 64), mode="graph")
    assert report.path == "graph" and report.verified and report["proj"].replaced
    assert new(torch.randn(3, 64)).shape == (3, 64)
