"""The `einrewrite --version` and `einrewrite structures` commands."""

from __future__ import annotations

from click.testing import CliRunner

from einrewrite import STRUCTURES, __version__
from einrewrite.cli import main


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_structures_table_lists_every_registry_entry() -> None:
    result = CliRunner().invoke(main, ["structures", "--d-in", "768", "--d-out", "3072"])
    assert result.exit_code == 0, result.output
    for name in STRUCTURES:
        assert name in result.output
    assert "ω" in result.output and "MACs/token" in result.output
    assert "2,359,296" in result.output  # dense 768 x 3072


def test_structures_rejects_bad_sizes_as_usage_error() -> None:
    result = CliRunner().invoke(main, ["structures", "--d-in", "0"])
    assert result.exit_code == 2
