"""`einrewrite export` and `einrewrite bench` through click's CliRunner: files, JSON, exit codes, errors."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from einrewrite.cli import main

import models  # noqa: F401  # type: ignore[import-not-found]  # puts the project root on sys.path, HF offline

FACTORY = "models:tiny_gpt"  # tests/models.py: the demo GPT at d=64, 2 layers


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An einrewrite output directory: the tiny GPT rewritten to BTT at 25% by ``einrewrite rewrite``."""
    out = tmp_path_factory.mktemp("cli_export") / "tg"
    code, output, err = run("rewrite", FACTORY, "--structure", "btt", "--budget", "0.25", "-o", str(out))
    assert code == 0, output + err
    return out


def test_export_writes_a_checked_onnx_file_and_refuses_to_overwrite(rewritten: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_text("stale")  # --force replaces it
    code, out, err = run("export", str(rewritten), "-o", str(target), "--force", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["path"] == str(target) and report["dtype"] == "float32"
    assert report["checked"] is True and report["max_abs_diff"] < 1e-4
    assert report["einsum_nodes"] == [] and report["op_counts"]["MatMul"] > 0
    assert report["providers_used"] == ["CPUExecutionProvider"]
    assert list(report["seconds"]) == ["capture", "translate", "optimize", "save", "check"]
    proto = onnx.load(str(target), load_external_data=False)  # a real ONNX model now, without Einsum
    assert "Einsum" not in {n.op_type for n in proto.graph.node}

    code, out, err = run("export", str(rewritten), "-o", str(target))
    assert code == 1
    assert "model.onnx: exists" in out + err and "--force" in out + err


def test_export_no_optimize_and_atol(rewritten: Path, tmp_path: Path) -> None:
    passes = {}
    for flag in ("--optimize", "--no-optimize"):
        target = tmp_path / f"{flag}.onnx"
        code, out, err = run("export", str(rewritten), "-o", str(target), flag, "--atol", "0.001", "--json")
        assert code == 0, out + err
        report = json.loads(out)
        assert report["checked"] is True and report["atol"] == 0.001
        passes[flag] = report["optimization"]
    assert passes == {"--optimize": "full", "--no-optimize": "none"}


def test_export_opset(rewritten: Path, tmp_path: Path) -> None:
    code, out, err = run("export", str(rewritten), "-o", str(tmp_path / "a.onnx"), "--opset", "23", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["opset"] == 23 and report["checked"] is True and report["op_counts"]["Attention"] == 2
    code, out, err = run("export", str(rewritten), "-o", str(tmp_path / "b.onnx"), "--opset", "17")
    assert code == 2 and "--opset" in out + err


def test_export_moe_grouping_picks_the_token_groups(tmp_path: Path) -> None:
    out = tmp_path / "moe"
    # the first block's MLP only: each export's time is mostly the MoE layers' groups
    only = ("--target", r"re:h\.0\.mlp\..*")
    code, output, err = run("rewrite", FACTORY, "--structure", "btt_moe", "--budget", "0.5", *only, "-o", str(out))
    assert code == 0, output + err
    nonzeros = {}
    for grouping in ("auto", "set", "expert"):
        target = tmp_path / f"{grouping}.onnx"
        code, output, err = run("export", str(out), "-o", str(target), "--moe-grouping", grouping, "--json")
        assert code == 0, output + err
        assert json.loads(output)["checked"] is True
        proto = onnx.load(str(target), load_external_data=False)
        nonzeros[grouping] = sum(n.op_type == "NonZero" for n in proto.graph.node)
    layers = 2  # c_fc and c_proj, each E=8, k=2: 8 groups by expert, C(8, 2) = 28 by expert pair
    assert nonzeros == {"auto": 8 * layers, "set": 28 * layers, "expert": 8 * layers}  # d=64 is narrow: auto = expert
    code, output, err = run("export", str(out), "-o", str(tmp_path / "x.onnx"), "--moe-grouping", "pairs")
    assert code == 2 and "pairs" in output + err


def test_export_errors_are_one_line_with_exit_codes(rewritten: Path, tmp_path: Path) -> None:
    code, out, err = run("export", str(tmp_path / "missing"), "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and "does not exist" in out + err
    code, out, err = run("export", str(rewritten), "-o", str(tmp_path / "m.onnx"), "--dtype", "bfloat16")
    assert code == 2 and "bfloat16" in out + err
    code, out, err = run("export", str(tmp_path), "-o", str(tmp_path / "m.onnx"))
    assert code == 1 and "no einrewrite.json" in out + err and "Traceback" not in out + err


def test_export_with_cuda_but_no_cuda_provider_is_a_clear_error(rewritten: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    code, out, err = run("export", str(rewritten), "-o", str(tmp_path / "c.onnx"), "--provider", "cuda")
    assert code == 1
    message = out + err
    assert "CUDAExecutionProvider" in message and "not available" in message and "onnxruntime-gpu" in message
    assert len(message.strip().splitlines()) == 1 and not (tmp_path / "c.onnx").exists()


def test_bench_prints_every_contender_and_the_ratios(rewritten: Path) -> None:
    code, out, err = run("bench", str(rewritten), "--tokens", "96", "--repeats", "1", "--json")
    assert code == 0, out + err
    (row,) = json.loads(out)["data"]["rows"]
    assert row["tokens"] == 96 and row["shape"] == [2, 48]  # 96 tokens > block_size 64: two sequences of 48
    assert set(row["times_ms"]) == {"dense torch", "structured torch", "structured compile", "dense ORT",
                                    "structured ORT"}
    assert min(row["times_ms"].values()) > 0
    assert set(row["ratios"]) == {"struct/dense torch", "struct/dense ORT", "ORT vs torch (struct)", "compile vs eager"}
    assert all(v is not None and v > 0 for v in row["ratios"].values())

    code, out, err = run("bench", str(rewritten), "--tokens", "1,8", "--repeats", "1", "--no-compile", "--no-onnx")
    assert code == 0, out + err
    assert "dense torch ms" in out and "struct/dense torch" in out and "structured compile ms" not in out
    assert "1x1" in out and "1x8" in out


def test_bench_says_where_the_rewrite_ran_slower_than_dense(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import einrewrite.cli.export as export_command
    from einrewrite.bench import BenchRow

    times = {"dense torch": 2.0, "structured torch": 4.0, "dense ORT": 1.0, "structured ORT": 0.5}
    rows = [BenchRow(1, dict(times), (1, 1)), BenchRow(512, {**times, "structured torch": 1.0}, (4, 128))]
    monkeypatch.setattr(export_command, "bench_saved", lambda *args, **kwargs: rows)
    code, out, err = run("bench", str(tmp_path), "--tokens", "1,512", "--no-compile")
    assert code == 0, out + err
    assert out.splitlines()[-1] == "SLOWER than dense in torch at 1 token (0.50x)"  # ONNX Runtime: faster at both


def test_bench_keep_denormals_leaves_onnxruntime_its_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import einrewrite.cli.export as export_command
    from einrewrite.bench import BenchRow

    asked = []
    rows = [BenchRow(1, {"dense ORT": 1.0, "structured ORT": 0.5}, (1, 1))]
    monkeypatch.setattr(export_command, "bench_saved", lambda *args, **kwargs: asked.append(kwargs) or rows)
    for flag, flushed in (("--keep-denormals", False), (None, True)):
        code, out, err = run("bench", str(tmp_path), "--tokens", "1", *([flag] if flag else []))
        assert code == 0, out + err
        assert asked[-1]["flush_denormals"] is flushed
        assert f"ORT denormals {'flushed' if flushed else 'kept'}" in out.splitlines()[0]


def test_bench_opset_and_atol_reach_both_exports(rewritten: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import einrewrite.bench as bench_module

    seen = []
    export = bench_module.export_onnx

    def spy(*args: object, **kwargs: object) -> object:
        report = export(*args, **kwargs)  # type: ignore[arg-type]
        seen.append((kwargs.get("opset"), report.atol))
        return report

    monkeypatch.setattr(bench_module, "export_onnx", spy)
    sessions = []
    session = bench_module.onnxruntime_session

    def keep(*args: object, **kwargs: object) -> object:
        sessions.append(session(*args, **kwargs))  # type: ignore[arg-type]
        return sessions[-1]

    monkeypatch.setattr(bench_module, "onnxruntime_session", keep)
    code, out, err = run("bench", str(rewritten), "--tokens", "16", "--repeats", "1", "--no-compile", "--opset", "23",
                         "--atol", "0.5", "--json")
    assert code == 0, out + err
    assert seen == [(23, 0.5), (23, 0.5)]  # the dense base and the rewrite, each checked with the tolerance asked
    # timed in turn: each session's threads stop spinning when its run ends, leaving the cores to the next
    spinning = [s.get_session_options().get_session_config_entry("session.force_spinning_stop") for s in sessions]
    assert spinning == ["1", "1"]
    flushing = [s.get_session_options().get_session_config_entry("session.set_denormal_as_zero") for s in sessions]
    assert flushing == ["1", "1"]  # by default; --keep-denormals leaves ORT's default
    assert json.loads(out)["data"]["denormals_flushed"] is True
    assert {"dense ORT", "structured ORT"} <= set(json.loads(out)["data"]["rows"][0]["times_ms"])


def test_bench_bad_tokens_is_a_usage_error(rewritten: Path) -> None:
    code, out, err = run("bench", str(rewritten), "--tokens", "1,x")
    assert code == 2 and "comma-separated positive integers" in out + err
    code, out, err = run("bench", str(rewritten), "--tokens", "0")
    assert code == 2
