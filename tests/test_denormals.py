"""Flushing denormals on the calling thread: set inside the block, restored after, also when it raises."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from einrewrite.denormals import denormals_flushed, flushes_denormals, flushing_denormals

needs_ftz = pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")


@needs_ftz
def test_the_block_flushes_and_the_previous_mode_comes_back() -> None:
    assert not flushes_denormals()
    with denormals_flushed() as supported:
        assert supported and flushes_denormals()
        assert torch.tensor([1e-39]).mul(2.0).item() == 0.0  # what torch computes here is flushed too
    assert not flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        with denormals_flushed():
            pass
        assert flushes_denormals()  # a caller that already flushed keeps flushing
    finally:
        torch.set_flush_denormal(False)


@needs_ftz
def test_a_wrapped_function_flushes_while_it_runs_and_restores_when_it_raises() -> None:
    def fails() -> None:
        assert flushes_denormals()
        raise ValueError("inside")

    assert flushing_denormals(flushes_denormals)() is True
    with pytest.raises(ValueError, match="inside"):
        flushing_denormals(fails)()
    assert not flushes_denormals()


@needs_ftz
def test_the_probe_holds_in_a_process_that_imported_it_while_flushing() -> None:
    script = (
        "import torch; torch.set_flush_denormal(True)\n"
        "from einrewrite.denormals import flushes_denormals\n"
        "assert flushes_denormals()\n"
        "torch.set_flush_denormal(False)\n"
        "assert not flushes_denormals()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
