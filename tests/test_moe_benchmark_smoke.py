"""benchmarks/moe.py --quick runs end to end and prints every row and a verdict (a benchmark, not a test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_moe_benchmark_quick_prints_every_row_and_verdict() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "vs moe dense" in line)
    assert "vs Linear" in header and "MACs/token" in header
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[lines.index(header) + 1 :]]
    for experts in ("8", "16"):
        for mode in ("fwd", "fwd+bwd"):
            rows = [c for c in cells if c[:2] == [experts, mode]]
            labels = {c[2] for c in rows}
            assert {"moe sparse", "moe dense", "nn.Linear"} <= labels, result.stdout
            assert any(label.startswith("same-MACs dense") for label in labels), result.stdout
            verdict = next(c for c in rows if c[2] == "=> sparse vs dense dispatch")
            assert verdict[3].endswith("x") and verdict[5] in ("MET", "MISSED"), verdict
