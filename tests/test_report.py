"""RewriteReport: the table people read, the JSON machines read, totals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from einrewrite import Decision, RewriteReport, SavedModelError


def _report() -> RewriteReport:
    layers = [
        Decision(fqn=f"h.{i}.mlp.c_fc", kind="Conv1D", status="replaced", path="module", d_in=64, d_out=256,
                 structure="btt", hyper={"rank": 1, "in_split": 0.5, "out_split": 0.5}, params_before=16384,
                 params_after=3072, macs_before=16384, macs_after=3072, budget_macs=4096,
                 projection_error=0.8 + i / 100)
        for i in range(3)
    ]
    layers.append(Decision(fqn="lm_head", kind="Linear", status="skipped", reason="tied_weight",
                           detail="weight is tied to wte.weight", d_in=64, d_out=128, params_before=8192,
                           params_after=8192, macs_before=8192, macs_after=8192))
    return RewriteReport(decisions=tuple(layers), path="module", config={"type": "RewriteConfig"}, verified=True,
                         output_error=0.25, model_params_before=100_000, model_params_after=60_000, seconds=0.5)


def test_totals() -> None:
    t = _report().totals()
    assert (t["layers"], t["replaced"], t["skipped"]) == (4, 3, 1)
    assert t["skipped_by_reason"] == {"tied_weight": 1}
    assert t["linear_macs_before"] == 3 * 16384 + 8192 and t["linear_macs_after"] == 3 * 3072 + 8192
    assert t["replaced_macs_after"] == 3 * 3072 and t["max_projection_error"] == pytest.approx(0.82)


def test_table_collapses_repeated_layers_and_ends_with_the_summary() -> None:
    report = _report()
    text = report.table()
    assert "h.{0..2}.mlp.c_fc" in text and "x3" in text and "0.820" in text  # worst projection error of the group
    assert "skipped: tied_weight" in text and "weight is tied to wte.weight" in text
    assert "replaced 3 of 4 candidate layers via the module path; skipped: tied_weight x1" in text
    assert "every replaced layer is on the forward path" in text
    full = report.table(collapse=False)
    assert "h.1.mlp.c_fc" in full and "{0..2}" not in full
    assert str(report) == text


def test_json_round_trip(tmp_path: Path) -> None:
    report = _report()
    text = report.to_json(tmp_path / "r.json")
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload == json.loads(text)
    assert payload["type"] == "RewriteReport" and payload["data"]["totals"]["replaced"] == 3
    assert payload["data"]["layers"][3]["reason"] == "tied_weight"
    again = RewriteReport.from_dict(payload)
    assert again == report


def test_lookup_and_bad_payloads() -> None:
    report = _report()
    assert report["lm_head"].reason == "tied_weight"
    with pytest.raises(KeyError, match="'nope' is not a layer of this report"):
        report["nope"]
    with pytest.raises(SavedModelError, match="expected {'type': 'RewriteReport'"):
        RewriteReport.from_dict({"type": "x"})
    with pytest.raises(SavedModelError, match="version 7 is not supported"):
        RewriteReport.from_dict({"type": "RewriteReport", "version": 7, "data": {}})
