"""`einrewrite inspect` and `einrewrite rewrite` through click's CliRunner: exit codes, tables, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from einrewrite import EinrewriteError, load_pretrained
from einrewrite.cli import main

import models  # noqa: F401  # type: ignore[import-not-found]  # puts the project root on sys.path, HF offline

FACTORY = "examples.tiny_gpt:build"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face GPT-2 directory with config.json only (no weights): built offline with random init."""
    from transformers import GPT2Config

    path = tmp_path_factory.mktemp("gpt2")
    GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=64, bos_token_id=0,
               eos_token_id=0, architectures=["GPT2LMHeadModel"]).save_pretrained(path)
    return path


def test_inspect_factory_table_and_json() -> None:
    code, out, _ = run("inspect", FACTORY)
    assert code == 0, out
    assert "h.0.attn.c_attn" in out and "no: tied_weight" in out and "btt @ budget" in out
    assert "9,216 (19%)" in out  # BTT rank 1 on the 128->384 layer
    code, out, _ = run("inspect", FACTORY, "--structure", "low_rank", "--budget", "0.5", "--json")
    assert code == 0
    data = json.loads(out)["data"]
    assert {layer["fqn"] for layer in data["layers"] if layer["targeted"]} >= {"h.0.mlp.c_fc", "h.1.mlp.c_proj"}
    assert data["costs"]["low_rank"]["h.0.attn.c_proj"] <= 0.5 * 128 * 128


def test_rewrite_factory_json_and_reload(tmp_path: Path) -> None:
    out_dir = tmp_path / "tg"
    code, out, err = run("rewrite", FACTORY, "--structure", "btt", "--budget", "0.25", "--exclude", "h.1.mlp.c_fc",
                         "-o", str(out_dir), "--json")
    assert code == 0, out + err
    payload = json.loads(out)
    assert payload["type"] == "RewriteReport" and payload["data"]["output_dir"] == str(out_dir)
    layers = {d["fqn"]: d for d in payload["data"]["layers"]}
    assert layers["h.1.mlp.c_fc"]["reason"] == "excluded" and layers["lm_head"]["reason"] == "tied_weight"
    assert layers["h.0.mlp.c_fc"]["status"] == "replaced" and layers["h.0.mlp.c_fc"]["structure"] == "btt"
    assert payload["data"]["verified"] is True
    assert f"saved to {out_dir}" in err
    reloaded = load_pretrained(out_dir)  # the factory recorded in einrewrite.json rebuilds the base
    assert reloaded.einrewrite_report.replaced[0].fqn == "h.0.attn.c_attn"

    # an einrewrite output as MODEL: only the layer excluded last time is left to rewrite
    code, out, _ = run("rewrite", str(out_dir), "-o", str(tmp_path / "again"), "--json")
    assert code == 0
    data = json.loads(out)["data"]
    assert [d["fqn"] for d in data["layers"] if d["status"] == "replaced"] == ["h.1.mlp.c_fc"]
    assert {d["reason"] for d in data["layers"] if d["status"] == "skipped"} == {"already_structured", "tied_weight"}
    assert data["verified"] is True  # the recorded factory also provides example inputs
    code, out, _ = run("rewrite", str(tmp_path / "again"), "-o", str(tmp_path / "third"))
    assert code == 0 and "nothing to do: the model is already rewritten" in out


def test_rewrite_hf_directory_with_a_config_file(tmp_path: Path, hf_dir: Path) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"type": "RewriteConfig", "version": 1,
                               "data": {"structure": "low_rank", "budget": {"ratio": 0.5}}}))
    code, out, err = run("rewrite", str(hf_dir), "--config", str(cfg), "--target", "c_fc", "-o", str(tmp_path / "o"))
    assert code == 0, out + err
    assert "low_rank(rank=" in out and "transformer.h.{0..1}.mlp.c_fc" in out
    assert "replaced 2 of 9 candidate layers" in out
    saved = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert saved == ["config.json", "einrewrite.json", "model.safetensors"]
    model = load_pretrained(tmp_path / "o")
    assert model(torch.randint(0, 128, (1, 5))).logits.shape == (1, 5, 128)


def test_einrewrite_errors_exit_1_with_one_line(tmp_path: Path) -> None:
    code, out, err = run("rewrite", FACTORY, "--budget", "0.01", "-o", str(tmp_path / "x"))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: h.0.attn.c_attn: btt needs >= ")
    assert "Traceback" not in err
    code, _, err = run("rewrite", FACTORY, "--target", "nope", "-o", str(tmp_path / "y"))
    assert code == 1 and "no layer was rewritten" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    code, _, err = run("rewrite", FACTORY, "-o", str(tmp_path / "full"))
    assert code == 1 and "not empty; pass --force" in err
    code, _, _ = run("rewrite", FACTORY, "-o", str(tmp_path / "full"), "--force")
    assert code == 0 and (tmp_path / "full" / "keep.txt").exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "RewriteConfig", "version": 1, "data": {"init": "svd"}}))
    code, _, err = run("inspect", FACTORY, "--config", str(bad))
    assert code == 1 and "init must be one of" in err


@pytest.mark.parametrize(
    "args",
    [
        ["rewrite", FACTORY],  # no -o
        ["rewrite", FACTORY, "-o", "x", "--budget", "0"],
        ["rewrite", FACTORY, "-o", "x", "--budget", "0.5", "--macs-per-token", "1000"],
        ["rewrite", FACTORY, "-o", "x", "--structure", "nope"],
        ["inspect", "no/such/dir"],
        ["inspect", "examples.no_such_module:build"],
        ["inspect", FACTORY, "--init", "svd"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    code, _, err = run(*args)
    assert code == 2, err
    assert "Usage:" in err or "Error:" in err


def test_debug_shows_the_exception() -> None:
    result = CliRunner().invoke(main, ["--debug", "inspect", FACTORY, "--config", "/dev/null/x.json"])
    assert result.exit_code == 2  # click validates the path first
    result = CliRunner().invoke(main, ["--debug", "rewrite", FACTORY, "--budget", "0.01", "-o", "unused"])
    assert result.exit_code == 1 and isinstance(result.exception, EinrewriteError)
