"""The benchmark scripts run end to end at small sizes and print their tables (benchmarks, not tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: int) -> str:
    """stdout of ``benchmarks/<script> args``; fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _rows_after(out: str, header_mark: str) -> tuple[str, list[list[str]]]:
    """The header line containing ``header_mark`` and the cells (split on 2+ spaces) of every later line."""
    lines = out.splitlines()
    header = next(line for line in lines if header_mark in line)
    return header, [re.split(r"\s{2,}", line.strip()) for line in lines[lines.index(header) + 1 :]]


def test_layers_benchmark_quick_prints_every_row() -> None:
    out = _run("layers.py", "--quick", timeout=30)
    header, cells = _rows_after(out, "realized/red.")
    assert "vs Linear" in header and "vs ref" in header and "FLOP red." in header
    rows = [c for c in cells if len(c) >= 6]
    for label in ("nn.Linear", "monarch", "btt r=1", "btt r=2", "btt r=4", "low_rank r=d/32", "kronecker"):
        modes = sorted(c[2] for c in rows if c[3] == label)
        assert modes == ["fwd", "fwd+bwd"], (label, out)
        assert all(float(c[5]) > 0 for c in rows if c[3] == label)  # a speedup was computed


def test_moe_benchmark_quick_prints_every_row_and_verdict() -> None:
    out = _run("moe.py", "--quick", "--threads", "1", timeout=120)
    header, cells = _rows_after(out, "vs moe dense")
    assert "vs Linear" in header and "MACs/token" in header
    for experts in ("8", "16"):
        for mode in ("fwd", "fwd+bwd"):
            rows = [c for c in cells if c[:2] == [experts, mode]]
            labels = {c[2] for c in rows}
            assert {"moe sparse", "moe dense", "nn.Linear"} <= labels, out
            assert any(label.startswith("same-MACs dense") for label in labels), out
            verdict = next(c for c in rows if c[2] == "=> sparse vs dense dispatch")
            assert verdict[3].endswith("x") and verdict[5] in ("MET", "MISSED"), verdict


def test_onnx_benchmark_quick_prints_ratios() -> None:
    out = _run("onnx.py", "--quick", "--repeats", "1", "--structures", "btt", "--profile", timeout=120)
    for contender in ("dense ORT", "btt ORT", "btt torch"):
        assert re.search(rf"^{contender}\s+\d+\.\d\s+\d+\.\d$", out, re.M), out  # best and median ms
    row = re.search(
        r"^btt\s+([\d.]+)x\s+([\d.]+)x\s+(met|MISSED)\s+([\d.]+)x \(([\d.]+)-([\d.]+)\)\s+([\d.]+)x\s+(met|MISSED)",
        out, re.M,
    )
    assert row is not None, out
    assert float(row.group(1)) > 5  # the rewrite really cut the linear MACs (1/8 budget)
    assert row.group(2) == row.group(4) == row.group(5) == row.group(6)  # one round: its ratio is the best's
    handed_off = re.search(r"^  btt\s+exported in \d+ s: \d+ nodes \(2 layers handed off", out, re.M)  # both MLPs
    assert "ORT parity" in out and handed_off, out
    assert re.search(r"^GPT d=256, .*, denormals flushed, torch ", out, re.M), out  # the sessions flush by default
    # --profile: the time in the rewritten layers and elsewhere, for dense and btt
    dense = re.search(r"rewritten layers \| elsewhere: dense ([\d.]+) \| ([\d.]+) ms", out)
    btt = re.search(r"^  btt\s+([\d.]+) \| ([\d.]+) ms: dense layers / these ([\d.]+)x; .* at most ([\d.]+)x",
                    out, re.M)
    assert dense is not None and btt is not None, out
    (d_layers, d_rest), (b_layers, b_rest, _, ceiling) = (map(float, m.groups()) for m in (dense, btt))
    assert min(d_layers, d_rest, b_layers, b_rest) > 0
    assert ceiling == pytest.approx((d_layers + d_rest) / b_rest, rel=0.02)
    total = re.search(r"ORT profile dense \(the median of 3 runs, ([\d.]+) ms in kernels\)", out)
    # every node of one run counted once: the two parts, each rounded to 0.1 ms, add up to the run's total
    assert total is not None and d_layers + d_rest == pytest.approx(float(total.group(1)), abs=0.15)


def test_onnx_benchmark_times_btt_moe_with_both_routers() -> None:
    small = ("--d", "256", "--layers", "1", "--heads", "4", "--batch", "2", "--seq", "64")  # one block
    # float16, as on a GPU: rounding may route tokens to other experts, which must not stop the run
    out = _run("onnx.py", *small, "--repeats", "1", "--structures", "btt_moe", "--dtype", "float16",
               "--keep-denormals", timeout=240)
    assert re.search(r"^GPT d=256, .*, denormals kept, torch ", out, re.M), out
    assert out.count("(float16 routing, no tolerance)") == 2, out
    loads = dict(re.findall(r"(btt_moe:\w+) .*max expert load ([\d.]+)x balanced", out))
    assert set(loads) == {"btt_moe:init", "btt_moe:random"}, out
    assert float(loads["btt_moe:init"]) == 4.0  # zero routers: every token on experts 0 and 1 (E/k = 4)
    assert 1.0 <= float(loads["btt_moe:random"]) < 4.0  # spread over the experts
    for name in loads:
        assert re.search(rf"^{name}\s+([\d.]+)x\s+([\d.]+)x\s+(met|MISSED)", out, re.M), out
