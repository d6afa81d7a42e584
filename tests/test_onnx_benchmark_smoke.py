"""Smoke tests: ``benchmarks/onnx.py`` at small sizes runs end to end and prints its ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int) -> str:
    """stdout of ``benchmarks/onnx.py --repeats 1 ARGS``, which must exit 0."""
    result = subprocess.run(
        [sys.executable, "benchmarks/onnx.py", "--repeats", "1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_onnx_benchmark_quick_prints_ratios() -> None:
    out = _run("--quick", "--structures", "btt", timeout=120)
    for contender in ("dense ORT", "btt ORT", "btt torch"):
        assert re.search(rf"^{contender}\s+\d+\.\d", out, re.M), out
    row = re.search(r"^btt\s+([\d.]+)x\s+([\d.]+)x\s+(met|MISSED)\s+([\d.]+)x\s+(met|MISSED)", out, re.M)
    assert row is not None, out
    assert float(row.group(1)) > 5  # the rewrite really cut the linear MACs (1/8 budget)
    assert "ORT parity" in out


def test_onnx_benchmark_quick_runs_btt_moe_with_spread_routers() -> None:
    small = ("--d", "256", "--layers", "1", "--heads", "4", "--batch", "2", "--seq", "64")  # one block: ~40 s
    out = _run(*small, "--structures", "btt_moe", "--router", "random", timeout=240)
    load = re.search(r"btt_moe .*routers 'random': max expert load ([\d.]+)x balanced", out)
    assert load is not None, out
    assert 1.0 <= float(load.group(1)) < 4.0  # E/k = 4 would mean every token on the same two experts
    assert re.search(r"^btt_moe\s+([\d.]+)x\s+([\d.]+)x\s+(met|MISSED)", out, re.M), out
