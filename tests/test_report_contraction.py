"""The report shows each replaced layer's contraction path and its cost (issue 6 §1)."""

from __future__ import annotations

import json

import torch
from torch import nn

from einrewrite import FlopBudget, RewriteConfig, RewriteReport, rewrite, structure
from einrewrite.contraction import plan_contraction
from einrewrite.report import REPORT_TOKENS, contraction_summary


def test_summary_is_the_plan_at_the_representative_token_count() -> None:
    spec = structure("kronecker", 256, 256)
    info = contraction_summary(spec)
    assert info is not None
    plan = plan_contraction(spec, REPORT_TOKENS)
    assert info["tokens"] == REPORT_TOKENS
    assert (info["kind"], info["order"], info["flops_per_token"]) == (plan.kind, plan.order, plan.cost)
    assert info["cost"] == plan.total_cost and info["cost"] >= REPORT_TOKENS * plan.cost
    assert info["plan"] == plan.describe() and info["onnx"].startswith("lowered ")
    assert contraction_summary(structure("dense", 16, 16)) is None
    assert contraction_summary(structure("btt", 64, 64, rank=2), tokens=8)["tokens"] == 8


def test_rewrite_report_carries_the_path_in_table_and_json() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Linear(64, 8))
    config = RewriteConfig(structure="monarch", budget=FlopBudget(ratio=0.5), exclude_modules=("3",))
    _, report = rewrite(model, config, torch.randn(2, 64))
    replaced = {d.fqn: d for d in report.replaced}
    assert set(replaced) == {"0", "2"}
    for d in replaced.values():
        assert d.contraction is not None and d.contraction["tokens"] == REPORT_TOKENS
        assert d.contraction["flops_per_token"] == 2 * d.macs_after  # FLOPs = 2 MACs for a two-stage monarch
    assert report["3"].contraction is None
    text = report.table()
    assert f"path @ {REPORT_TOKENS} tok" in text and "bmm xA" in text and "FLOPs/tok" in text

    payload = json.loads(report.to_json())
    assert payload["data"]["layers"][0]["contraction"]["plan"].startswith("bmm xA feature-major")
    assert RewriteReport.from_dict(payload) == report


def test_reports_written_before_the_path_existed_still_load() -> None:
    torch.manual_seed(0)
    _, report = rewrite(nn.Sequential(nn.Linear(64, 64)), RewriteConfig(structure="btt"), torch.randn(2, 64))
    payload = report.to_dict()
    for layer in payload["data"]["layers"]:
        del layer["contraction"]
    old = RewriteReport.from_dict(payload)
    assert old.replaced[0].contraction is None
    assert "path @" in old.table()  # the column shows "-" for layers without a recorded path


def test_moe_layers_report_their_routed_path() -> None:
    spec = structure("btt_moe", 256, 256)
    info = contraction_summary(spec)
    assert info is not None and info["kind"] == f"moe top{spec.top_k}/{spec.num_experts}"
    assert info["flops_per_token"] == 2 * spec.macs  # router + the k active experts
    assert "per expert on ~512 tokens" in info["plan"] and "NonZero" in info["onnx"]
