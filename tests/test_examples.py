"""Smoke tests: every script in examples/ runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_structures_demo_prints_every_structure() -> None:
    out = run("examples/structures_demo.py", "--d", "64", "--tokens", "64", "--repeats", "1")
    for name in ("monarch", "btt", "low_rank", "kronecker", "tensor_train", "dense", "einsum"):
        assert name in out
    assert "vs nn.Linear" in out and "proj. error" in out


def test_rewrite_demo_ends_with_the_model_in_onnxruntime() -> None:
    out = run("examples/rewrite_demo.py", "--tokens", "128", "--repeats", "1", timeout=240)
    assert "reloaded outputs equal the rewritten ones: True" in out
    assert "btt   exported:" in out and " 0 Einsum; ORT vs PyTorch max |diff|" in out
    assert "btt in ORT at (2, 64) vs PyTorch" in out and "vs the dense export" in out
