"""Frontiers and power-law fits on synthetic points, and the quick scaling-law run (CSV and PNG)."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

from einrewrite.scaling import FitError, PowerLaw, compute_multiplier, fit_power_law, pareto_frontier

ROOT = Path(__file__).resolve().parents[1]


def _law(c: float, a: float = 8.0, b: float = 0.15, offset: float = 0.0) -> float:
    return a * c**-b + offset


def test_frontier_keeps_exactly_the_undominated_points() -> None:
    rng = random.Random(0)
    best = [(10.0**k, _law(10.0**k)) for k in range(3, 10)]
    dominated = [(c * rng.uniform(1.0, 3.0), loss * rng.uniform(1.01, 1.5)) for c, loss in best]
    noise = [(float("nan"), 1.0), (0.0, 0.1), (-5.0, 0.1)]  # not points of a log-log frontier
    points = dominated + best + noise
    rng.shuffle(points)
    assert pareto_frontier(points) == best
    assert pareto_frontier([(1, 3.0), (1, 2.0), (2, 2.0), (3, 1.0)]) == [(1.0, 2.0), (3.0, 1.0)]
    assert pareto_frontier([]) == []


def test_power_law_fit_recovers_exponent_scale_and_offset() -> None:
    points = [(10.0**k, _law(10.0**k)) for k in range(2, 9)]
    law = fit_power_law(points)
    assert law.a == pytest.approx(8.0, rel=1e-9) and law.b == pytest.approx(0.15, rel=1e-9)
    assert law.c == 0.0 and law.r2 == pytest.approx(1.0) and law.n == 7
    assert law.compute_for(float(law(1e5))) == pytest.approx(1e5, rel=1e-9)
    with_offset = [(10.0**k, _law(10.0**k, a=5.0, b=0.3, offset=1.2)) for k in range(1, 9)]
    fitted = fit_power_law(with_offset, offset="fit")
    assert fitted.c == pytest.approx(1.2, abs=1e-3)
    assert fitted.b == pytest.approx(0.3, rel=1e-2) and fitted.a == pytest.approx(5.0, rel=2e-2)
    fixed = fit_power_law(with_offset, offset=1.2)
    assert fixed.b == pytest.approx(0.3, rel=1e-9)
    window = fit_power_law(points + [(1e12, 100.0)], compute_range=(1e2, 1e8))
    assert window.b == pytest.approx(0.15, rel=1e-9)


def test_compute_multiplier_against_a_reference_law() -> None:
    dense = PowerLaw(a=8.0, b=0.15, c=0.0, r2=1.0, n=5)
    better = [(c, float(dense(3 * c))) for c in (1e4, 1e6)]  # reaches dense's loss with 3x less compute
    assert compute_multiplier(dense, better) == pytest.approx([3.0, 3.0])


def test_fit_errors_say_what_is_needed() -> None:
    with pytest.raises(FitError, match="need at least 2 points at 2 or more compute values"):
        fit_power_law([(1e3, 2.0)])
    with pytest.raises(FitError, match="need at least 3"):
        fit_power_law([(1e3, 2.0), (1e4, 1.5)], offset="fit")
    with pytest.raises(FitError, match="not below every loss"):
        fit_power_law([(1e3, 2.0), (1e4, 1.5)], offset=1.6)


def test_quick_scaling_run_writes_csv_and_png(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    result = subprocess.run([sys.executable, "examples/scaling_laws.py", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "points.csv", newline="") as f:
        points = list(csv.DictReader(f))
    structures = {p["structure"] for p in points}
    assert len(structures) == 5 and "dense" in structures and any("moe" in s for s in structures)
    assert all(float(p["compute"]) > 0 and float(p["val_loss"]) > 0 for p in points)
    for s in structures:  # each structure's frontier is marked, and has at least two points to fit
        assert sum(int(p["frontier"]) for p in points if p["structure"] == s) >= 2
    with open(out / "fits.csv", newline="") as f:
        fits = list(csv.DictReader(f))
    assert {r["structure"] for r in fits} == structures and all(float(r["b"]) > 0 for r in fits)
    png = (out / "scaling_laws.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "ordering at C =" in result.stdout
