"""`einrewrite search`: table and CSV, resume, filter, and errors as one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from einrewrite.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


LM = ["search", "--structure", "dense", "--structure", "btt", "--no-paper", "--theta", "(.5|.5|0|.5|.5|0|0)",
      "--width", "32", "--layers", "1", "--steps", "3", "--batch-size", "4", "--block-size", "16",
      "--corpus-bytes", "100000", "--budget", "0.8", "--no-progress"]


def test_cli_search_lm_table_csv_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "search.csv"
    result = CliRunner().invoke(main, [*LM, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "budget:" in result.output and "val loss" in result.output
    for name in ("dense", "btt", "θ=(.5|.5|0|.5|.5|0|0)"):
        assert name in result.output
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["candidate"] for r in rows} == {"dense", "btt", "θ=(.5|.5|0|.5|.5|0|0)"}
    assert all(
        r["status"] == "ok" and float(r["val_loss"]) > 0 and int(r["macs"]) <= int(r["budget_macs"]) for r in rows
    )
    again = CliRunner().invoke(main, [*LM, "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert "resumed 3 candidates" in again.output


def test_cli_search_regression_json_and_filter() -> None:
    args = ["search", "--task", "regression", "--width", "8", "--steps", "5", "--structure", "dense",
            "--where", "omega == 0 and psi == 1", "--no-progress", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    status = {r["candidate"]: r["status"] for r in payload["rows"]}
    assert status["dense"] == "ok" and status["θ=(.5|.5|0|.5|.5|0|0)"] == "filtered"
    assert payload["rows"][0]["status"] == "ok"


def test_cli_search_errors() -> None:
    bad = CliRunner().invoke(main, ["search", "--task", "regression", "--where", "import os", "--no-progress"])
    assert bad.exit_code == 1 and "not a valid expression" in bad.output
    none = CliRunner().invoke(main, ["search", "--no-named", "--no-paper"])
    assert none.exit_code == 2 and "no candidates" in none.output
