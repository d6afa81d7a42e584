"""The graph path: F.linear / x @ w.T on bare parameters become structured submodules of a GraphModule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

import einrewrite as er
from einrewrite import EinsumLinear, FlopBudget, RewriteConfig, TraceError
from einrewrite.structures import LowRank

from models import FunctionalModel, tiny_gpt2, token_ids  # type: ignore[import-not-found]

CFG = RewriteConfig(structure="low_rank", budget=FlopBudget(ratio=0.5), min_features=8)


def test_functional_linears_take_the_graph_path() -> None:
    model = FunctionalModel()
    x = torch.randn(3, 5, 32)
    new, report = er.rewrite(model, CFG, x)
    assert isinstance(new, fx.GraphModule) and report.path == "graph" and report.verified
    kinds = {d.fqn: (d.kind, d.path, d.d_in, d.d_out) for d in report.decisions}
    assert kinds == {
        "blocks.0.w": ("F.linear", "graph", 32, 48),
        "blocks.0.v": ("F.linear", "graph", 48, 32),
        "blocks.1.w": ("F.linear", "graph", 32, 48),
        "blocks.1.v": ("F.linear", "graph", 48, 32),
        "head": ("Linear", "graph", 32, 24),
    }
    assert all(d.macs_after <= 0.5 * d.macs_before for d in report.replaced)
    assert isinstance(new.get_submodule("blocks.0.w"), EinsumLinear)
    keys = set(new.state_dict())
    assert {"blocks.0.w.A", "blocks.0.w.B", "blocks.0.w.bias", "head.A", "head.bias"} <= keys
    assert "blocks.0.w.weight" not in keys and "blocks.0.scale" in keys
    new.graph.lint()
    calls = [n.target for n in new.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"]
    assert calls == ["blocks.0.w", "blocks.0.v", "blocks.1.w", "blocks.1.v", "head"]
    y = new(torch.randn(4, 7, 32))  # other batch and sequence sizes
    assert y.shape == (4, 7, 24)
    assert isinstance(model.head, nn.Linear) and isinstance(model.blocks[0].w, nn.Parameter)  # input untouched


def test_graph_path_is_exact_at_full_rank() -> None:
    model = FunctionalModel()
    x = torch.randn(2, 3, 32)
    cfg = RewriteConfig(structure=LowRank(rank=32), budget=FlopBudget(ratio=2.0), min_features=8,
                        overrides={"head": LowRank(rank=24)})
    new, report = er.rewrite(model, cfg, x, mode="graph")
    assert report.path == "graph"
    torch.testing.assert_close(new(x), model(x), atol=1e-4, rtol=1e-4)


class _SharedWeight(nn.Module):
    """One weight used by two F.linear calls with different biases, and one read outside a linear op."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.b1 = nn.Parameter(torch.randn(32))
        self.b2 = nn.Parameter(torch.randn(32))
        self.u = nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(F.linear(x, self.w, self.b1), self.w, self.b2)
        return F.linear(h, self.u) + self.u.diagonal()


def test_shared_weights_keep_their_biases_and_weights_read_elsewhere_are_skipped() -> None:
    model = _SharedWeight()
    x = torch.randn(4, 32)
    cfg = RewriteConfig(structure=LowRank(rank=32), budget=FlopBudget(ratio=2.0))
    new, report = er.rewrite(model, cfg, x)
    assert report["w"].replaced and report["w"].has_bias  # two biases: kept as adds after one shared layer
    assert report["u"].reason == "read_directly" and "diagonal" in report["u"].detail
    assert sum(n.op == "call_module" and n.target == "w" for n in new.graph.nodes) == 2
    torch.testing.assert_close(new(x), model(x), atol=1e-4, rtol=1e-4)


def test_graph_mode_on_gpt2_rewrites_conv1d_addmm_nodes() -> None:
    model = tiny_gpt2()
    ids = token_ids()
    cfg = RewriteConfig(structure=LowRank(rank=64), budget=FlopBudget(ratio=2.0))
    new, report = er.rewrite(model, cfg, {**ids, "use_cache": False}, mode="graph")
    assert isinstance(new, fx.GraphModule)
    assert {d.kind for d in report.replaced} == {"Conv1D"} and len(report.replaced) == 8
    assert report["lm_head"].reason == "tied_weight"
    ref = model(**ids, use_cache=False).logits
    torch.testing.assert_close(new(**ids, use_cache=False).logits, ref, atol=2e-4, rtol=1e-4)


def test_auto_mode_without_example_inputs_reports_what_it_could_not_check() -> None:
    model = FunctionalModel()
    new, report = er.rewrite(model, CFG)
    assert report.path == "module" and not isinstance(new, fx.GraphModule)
    assert report["blocks.0.w"].reason == "needs_example_inputs"
    assert "pass example_inputs" in report["blocks.0.w"].detail
    assert report["head"].replaced
    assert any("liveness not checked" in n for n in report.notes)
    with pytest.raises(TraceError, match="mode='graph' needs example_inputs"):
        er.rewrite(model, CFG, mode="graph")


def test_module_mode_never_traces() -> None:
    _, report = er.rewrite(FunctionalModel(), CFG, torch.randn(2, 32), mode="module")
    assert report["blocks.1.v"].reason == "not_traced" and "mode='module'" in report["blocks.1.v"].detail


def test_graph_save_and_load_round_trip(tmp_path: Path) -> None:
    model = FunctionalModel()
    x = torch.randn(3, 5, 32)
    new, report = er.rewrite(model, CFG, x)
    out = er.save_pretrained(new, tmp_path / "fn", report)
    assert (out / "example_inputs.safetensors").is_file()
    reloaded = er.load_pretrained(out, base_model=FunctionalModel())
    assert isinstance(reloaded, fx.GraphModule)
    assert torch.equal(new(x), reloaded(x))


class _HalfTraceable(nn.Module):
    """An nn.Linear (module path) and an F.linear behind data-dependent control flow (export fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.w = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return F.linear(h, self.w) if h.sum().item() > -1e9 else h


def test_export_failure_in_auto_mode_keeps_the_module_path_and_says_why() -> None:
    model = _HalfTraceable()
    new, report = er.rewrite(model, RewriteConfig(), torch.randn(2, 64))
    assert report.path == "module" and report["fc"].replaced
    assert report["w"].reason == "not_traced" and "torch.export failed" in report["w"].detail
    assert any(n.startswith("graph path unavailable, kept the module path") for n in report.notes)
    with pytest.raises(TraceError, match=r"torch.export \(non-strict\) failed"):
        er.rewrite(model, RewriteConfig(), torch.randn(2, 64), mode="graph")
