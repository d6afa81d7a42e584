"""benchmarks/layers.py --quick runs end to end and prints its table (it is a benchmark, not a test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layers_benchmark_quick_prints_every_row() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "layers.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "realized/red." in line)
    assert "vs Linear" in header and "vs ref" in header and "FLOP red." in header
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[lines.index(header) + 1 :]]
    rows = [c for c in cells if len(c) >= 6]
    for label in ("nn.Linear", "monarch", "btt r=1", "btt r=2", "btt r=4", "low_rank r=d/32", "kronecker"):
        modes = sorted(c[2] for c in rows if c[3] == label)
        assert modes == ["fwd", "fwd+bwd"], (label, result.stdout)
        assert all(float(c[5]) > 0 for c in rows if c[3] == label)  # a speedup was computed
