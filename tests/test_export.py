"""ONNX export: every structure lowers to MatMul chains, matches PyTorch in ONNX Runtime, shapes stay dynamic."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import Tensor, nn

from einrewrite import (
    STRUCTURES, EinsumLinear, EinsumSpec, ExportError, RewriteConfig, export_onnx, rewrite, structure,
)
from einrewrite import export as export_module
from einrewrite.denormals import flushes_denormals
from einrewrite.export import onnxruntime_session

import models  # type: ignore[import-not-found]  # tests/models.py

EINSUM_NAMES = sorted(n for n in STRUCTURES if isinstance(STRUCTURES[n].example().bind(16, 16), EinsumSpec))


def _ops(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}


@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_every_structure_exports_without_einsum_and_matches(name: str, tmp_path: Path) -> None:
    layer = EinsumLinear(STRUCTURES[name].example().bind(24, 40))
    with torch.no_grad():
        layer.bias.normal_()
    report = export_onnx(layer, (torch.randn(2, 5, 24),), tmp_path / "layer.onnx")
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert "Einsum" not in _ops(tmp_path / "layer.onnx") and not report.einsum_nodes
    assert "MatMul" in report.op_counts or "Gemm" in report.op_counts  # dense with bias: one Gemm
    # dynamic batch and sequence: run at shapes other than the export's
    session = onnxruntime_session(tmp_path / "layer.onnx")
    for shape in [(3, 7, 24), (1, 1, 24)]:
        x = torch.randn(*shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), layer(x).detach(), rtol=1e-4, atol=1e-4)


def test_float16_export_runs_in_onnxruntime(tmp_path: Path) -> None:
    layer = EinsumLinear(structure("btt", 64, 96, rank=2))
    report = export_onnx(layer, (torch.randn(4, 64),), tmp_path / "half.onnx", dtype="float16")
    assert report.dtype == "float16" and report.checked
    proto = onnx.load(str(tmp_path / "half.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_the_report_times_each_step_and_the_log_names_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layer = EinsumLinear(structure("btt", 64, 96, rank=2))
    with caplog.at_level(logging.INFO):  # as `einrewrite -v` sets the root logger
        report = export_onnx(layer, (torch.randn(4, 64),), tmp_path / "m.onnx")
    assert list(report.seconds) == ["capture", "translate", "optimize", "save", "check"]
    assert all(t > 0 for t in report.seconds.values())
    assert f"took {sum(report.seconds.values()):.1f} s: capture" in report.summary()
    assert "capturing EinsumLinear with torch.export" in caplog.text and "in ONNX Runtime against" in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("onnxscript")]  # its per-input notes stay quiet
    assert "parity with PyTorch" not in caplog.text  # the summary is the caller's to print (the CLI prints it once)
    assert f"exported {tmp_path / 'm.onnx'} in" in caplog.text
    unchecked = export_onnx(layer, (torch.randn(4, 64),), tmp_path / "u.onnx", check=False)
    assert list(unchecked.seconds) == ["capture", "translate", "optimize", "save"]


def test_graph_optimizer_runs_in_full_on_small_graphs_and_only_folds_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = models.tiny_gpt()
    small = export_onnx(model, x, tmp_path / "small.onnx")
    assert small.optimization == "full" and "optimized" in small.summary()
    monkeypatch.setattr(export_module, "OPTIMIZE_MAX_NODES", 1)  # every graph is "large" now
    large = export_onnx(model, x, tmp_path / "large.onnx")
    assert large.optimization == "fold" and "constants folded" in large.summary()
    assert large.checked and large.max_abs_diff is not None and large.max_abs_diff < 1e-4  # still faithful
    # folded: the exporter's SplitToSequence (attention's q, k, v split) became a Split, as the full optimizer does
    assert "SplitToSequence" not in large.op_counts and large.op_counts["Split"] == small.op_counts["Split"]
    forced = export_onnx(model, x, tmp_path / "forced.onnx", optimize=True)
    assert forced.optimization == "full" and forced.op_counts == small.op_counts
    monkeypatch.undo()
    off = export_onnx(model, x, tmp_path / "off.onnx", optimize=False)
    assert off.optimization == "none" and "not optimized" in off.summary() and off.checked
    assert "SplitToSequence" in off.op_counts  # what folding removes
    assert sum(off.op_counts.values()) > sum(large.op_counts.values()) > sum(small.op_counts.values())


class _Branchy(nn.Module):
    """Most of its nodes inside an ``If`` (a ``torch.cond`` on the batch size), as a BTT-MoE layer's groups are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def many(x: torch.Tensor) -> torch.Tensor:
            for _ in range(8):
                x = torch.sin(x) * 2.0 + 1.0
            return x

        def few(x: torch.Tensor) -> torch.Tensor:
            return x + 1.0

        return torch.cond(x.shape[0] > 4, many, few, (x,))


def test_the_optimizer_node_limit_counts_the_nodes_inside_if_branches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = _Branchy(), (torch.randn(6, 3),)
    off = export_onnx(model, x, tmp_path / "off.onnx", optimize=False)
    top = len(onnx.load(str(tmp_path / "off.onnx")).graph.node)
    assert off.op_counts["If"] == 1 and sum(off.op_counts.values()) > top + 20  # the branches hold most nodes
    monkeypatch.setattr(export_module, "OPTIMIZE_MAX_NODES", top + 10)  # above the top level, below all nodes
    report = export_onnx(model, x, tmp_path / "branchy.onnx")
    assert report.optimization == "fold" and report.checked


def test_parity_failure_says_whether_the_model_itself_is_sensitive_to_rounding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x = models.tiny_gpt()  # ORT's LayerNorm, GELU and softmax round differently from PyTorch's
    # atol 0: any rounding difference fails; the model's own float32 vs float64 gap is > 0, so this is the hint
    with pytest.raises(ExportError, match=r"differs from float64 by .* larger atol \(CLI: --atol\)"):
        export_onnx(model, x, tmp_path / "tight.onnx", atol=0.0, rtol=0.0)
    with pytest.raises(ExportError, match=r"own float16 output differs from float64 by .* larger atol"):
        export_onnx(model, x, tmp_path / "half.onnx", dtype="float16", atol=0.0, rtol=0.0)
    monkeypatch.setattr(export_module, "_float64_deviation", lambda *a: 0.0)  # as if exact in float32
    with pytest.raises(ExportError, match="the export is not faithful"):
        export_onnx(model, x, tmp_path / "tight.onnx", atol=0.0, rtol=0.0)


def test_a_session_for_timing_stops_its_threads_spinning_after_each_run(tmp_path: Path) -> None:
    export_onnx(nn.Linear(3, 3), (torch.randn(2, 3),), tmp_path / "l.onnx", check=False)
    timed = onnxruntime_session(tmp_path / "l.onnx", stop_spinning=True).get_session_options()
    assert timed.get_session_config_entry("session.force_spinning_stop") == "1"
    plain = onnxruntime_session(tmp_path / "l.onnx").get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default: threads keep spinning
        plain.get_session_config_entry("session.force_spinning_stop")


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")
@pytest.mark.parametrize("threads", [1, 2])
def test_a_session_that_flushes_denormals_flushes_them_on_every_thread_that_runs(tmp_path: Path, threads: int) -> None:
    export_onnx(_Doubles(), (torch.randn(4, 4096),), tmp_path / "double.onnx", check=False)
    tiny = torch.full((256, 4096), 1e-39)  # denormal float32; enough rows for ORT to split the Mul over threads
    plain = onnxruntime_session(tmp_path / "double.onnx", threads=threads)
    flushing = onnxruntime_session(tmp_path / "double.onnx", threads=threads, flush_denormals=True)
    assert flushing.get_session_options().get_session_config_entry("session.set_denormal_as_zero") == "1"
    (kept,) = plain.run(None, {"x": tiny.numpy()})
    (flushed,) = flushing.run(None, {"x": tiny.numpy()})
    assert (kept != 0).all()  # ORT's default keeps denormals
    assert (flushed == 0).all()  # with one thread: the caller flushed; with two: the worker too
    assert not flushes_denormals()  # the caller's mode is back


class _Doubles(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2.0  # a denormal input stays denormal unless flushed


def test_model_is_not_modified(tmp_path: Path) -> None:
    model = nn.Sequential(EinsumLinear(structure("monarch", 32, 32)), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, (torch.randn(3, 32),), tmp_path / "m.onnx", dtype="float16")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


class _IdsAndMask(nn.Module):
    """Embeds token ids and zeroes the masked positions: two inputs, one of them keyword-only in practice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.proj = EinsumLinear(structure("monarch", 16, 16))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.proj(self.embed(input_ids))  # (B, T, 16)
        return h if attention_mask is None else h * attention_mask[..., None]


def test_example_inputs_may_be_keyword_inputs_as_for_rewrite(tmp_path: Path) -> None:
    """A dict (a tokenizer's output), merged with ``example_kwargs``; both inputs stay inputs of the graph."""
    ids, mask = torch.randint(0, 32, (2, 8)), torch.ones(2, 8)
    path = tmp_path / "kw.onnx"
    report = export_onnx(_IdsAndMask(), {"input_ids": ids}, path, example_kwargs={"attention_mask": mask})
    assert report.checked
    assert [i.name for i in onnxruntime_session(path).get_inputs()] == ["input_ids", "attention_mask"]


def test_without_example_inputs_a_hugging_face_model_exports_from_its_config(tmp_path: Path) -> None:
    report = export_onnx(models.tiny_bert(), None, tmp_path / "bert.onnx")
    assert report.checked and report.checked_shapes[0] == [2, 8]  # default_example_inputs: a batch of 2 x 8 ids
    with pytest.raises(ExportError, match=r"Sequential: no example inputs.*pass example_inputs \(a tensor"):
        export_onnx(nn.Sequential(nn.Linear(4, 4)), None, tmp_path / "none.onnx")


def test_exporter_failure_is_an_export_error_naming_the_op_and_layer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), models.Untranslatable())
    with pytest.raises(ExportError, match=r"failed at op einrewrite_test[.:]+mystery\S* in layer '1'.*"
                       r"custom_translation_table=\{op: fn\}"):
        export_onnx(model, (torch.randn(2, 3),), tmp_path / "bad.onnx")


def test_the_callers_translation_exports_an_op_the_exporter_does_not_know(tmp_path: Path) -> None:
    from onnxscript import opset18 as op

    def mystery(x: object) -> object:  # onnxscript: the op doubles its input
        return op.Add(x, x)

    model = nn.Sequential(nn.Linear(3, 3), models.Untranslatable())
    table = {torch.ops.einrewrite_test.mystery.default: mystery}
    report = export_onnx(model, (torch.randn(2, 3),), tmp_path / "ok.onnx", custom_translation_table=table)
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff < 1e-6
    assert report.op_counts.get("Add", 0) >= 1


def test_a_model_onnx_runtime_loads_but_cannot_run_is_an_export_error_naming_the_node(tmp_path: Path) -> None:
    from onnxscript import opset18 as op

    def mystery(x: object) -> object:  # valid ONNX, but 7 rows do not divide the 2x3 example
        return op.Reshape(x, op.Constant(value_ints=[7, -1]))

    model = nn.Sequential(nn.Linear(3, 3), models.Untranslatable())
    table = {torch.ops.einrewrite_test.mystery.default: mystery}
    with pytest.raises(ExportError, match=r"loaded \S*fails\.onnx but could not run it at node 'node_mystery' in "
                       r"layer '1' on input \[2, 3\]: .*Reshape.*optimize=False") as caught:
        export_onnx(model, (torch.randn(2, 3),), tmp_path / "fails.onnx", custom_translation_table=table)
    assert "Traceback" not in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_nodes_an_accelerator_left_to_the_cpu_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    """The placement parser on a stand-in for an ORT session whose CUDA provider left two nodes to the CPU."""
    from types import SimpleNamespace

    def subgraph(ep: str, *ops: str) -> SimpleNamespace:
        nodes = [SimpleNamespace(op_type=op, name=f"n{i}") for i, op in enumerate(ops)]
        return SimpleNamespace(ep_name=ep, get_nodes=lambda: nodes)

    session = SimpleNamespace(get_provider_graph_assignment_info=lambda: [
        subgraph("CUDAExecutionProvider", "MatMul", "MatMul", "Add"),
        subgraph("CPUExecutionProvider", "NonZero", "Shape"),
    ])
    report = export_module.ExportReport(path="m.onnx", dtype="float16", opset=20, op_counts={})
    export_module._record_placement(session, report, "CUDAExecutionProvider")
    assert report.placement == {"CUDAExecutionProvider": 3, "CPUExecutionProvider": 2}
    assert report.fallback_nodes == ["NonZero:n0", "Shape:n1"]
    assert "2 nodes fell back to CPU" in report.summary()
    assert "fell back from CUDAExecutionProvider to CPU" in caplog.text

    on_cpu = export_module.ExportReport(path="m.onnx", dtype="float32", opset=20, op_counts={})
    export_module._record_placement(session, on_cpu, "CPUExecutionProvider")  # CPU asked for: nothing fell back
    assert not on_cpu.fallback_nodes and "fell back" not in on_cpu.summary()


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def test_untraceable_model_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"torch.export could not capture _DataDependent"):
        export_onnx(_DataDependent(), (torch.randn(2, 3),), tmp_path / "dd.onnx")


def test_unavailable_provider_is_a_clear_error(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    layer = EinsumLinear(structure("monarch", 16, 16))
    with pytest.raises(ExportError, match=r"CUDAExecutionProvider.*not available.*einrewrite\[gpu\]"):
        export_onnx(layer, (torch.randn(2, 16),), tmp_path / "c.onnx", providers="cuda")


@pytest.mark.gpu
def test_cuda_provider_fp16_parity(tmp_path: Path) -> None:
    layer = EinsumLinear(structure("btt", 256, 256, rank=2))
    report = export_onnx(layer, (torch.randn(8, 256),), tmp_path / "g.onnx", dtype="float16", providers="cuda")
    assert report.providers_used[0] == "CUDAExecutionProvider"
    assert report.checked


def test_nodes_keep_their_module_path_but_not_the_exporters_stack_traces(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), EinsumLinear(structure("btt", 32, 32, rank=2))).eval()
    export_onnx(model, (torch.randn(3, 16),), tmp_path / "m.onnx", check=False)
    keys = [{p.key for p in node.metadata_props} for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert any("pkg.torch.onnx.name_scopes" in k for k in keys)  # where each node came from stays
    assert not any(k & {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"} for k in keys)


def _two_btt_layers() -> nn.Module:
    """Token ids -> embedding -> two BTT layers."""
    return nn.Sequential(
        nn.Embedding(128, 64), EinsumLinear(structure("btt", 64, 96, rank=2)), nn.GELU(),
        EinsumLinear(structure("btt", 96, 64, rank=2)),
    ).eval()


def _input_dims(path: Path) -> list[int | str]:
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def _no_doubled_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the capture from the example doubled, as for a model that PyTorch cannot run doubled."""
    monkeypatch.setattr(export_module, "_pytorch_runs", lambda *args: False)  # its only caller: the doubled example


@pytest.mark.parametrize("capture", ["doubled", "sizes of 1 kept"])
def test_an_example_batch_of_one_keeps_the_batch_dynamic(
    capture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense, example = models.tiny_gpt()
    model, _ = rewrite(dense, RewriteConfig(structure="btt"), example)
    ids = example[0][:1]  # one sequence
    if capture == "sizes of 1 kept":
        _no_doubled_capture(monkeypatch)
    report = export_onnx(model, (ids,), tmp_path / "one.onnx")
    assert report.fixed_sizes == []
    if capture == "doubled":  # captured at batch 2, checked there and at the example
        assert report.doubled_sizes == ["idx axis 0"] and report.checked_shapes == [[2, 16], [1, 16]]
        assert "captured from the example doubled along idx axis 0" in report.summary()
    else:  # captured at batch 1, checked there and at batch 2 (fails with a view of a strided tensor in lowering)
        assert report.doubled_sizes == [] and report.checked_shapes == [[1, 16], [2, 16]]
    assert all(isinstance(d, str) for d in _input_dims(tmp_path / "one.onnx"))
    session = onnxruntime_session(tmp_path / "one.onnx")
    ids = torch.randint(0, 64, (3, 7))
    (got,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model(ids).detach(), rtol=1e-4, atol=1e-4)


def test_without_a_check_a_size_of_one_is_fixed_and_reported(tmp_path: Path) -> None:
    torch_notes = _Records()
    capture_log = logging.getLogger("torch._export.non_strict_utils")  # where torch.export notes the fixed size
    capture_log.addHandler(torch_notes)
    try:
        report = export_onnx(_two_btt_layers(), (torch.randint(0, 128, (1, 8)),), tmp_path / "u.onnx", check=False)
    finally:
        capture_log.removeHandler(torch_notes)
    assert report.fixed_sizes == ["input axis 0"]  # Sequential.forward(input): the ONNX input's name too
    assert onnx.load(str(tmp_path / "u.onnx"), load_external_data=False).graph.input[0].name == "input"
    assert _input_dims(tmp_path / "u.onnx")[0] == 1  # a batch of one, and nothing else, as the report says
    assert "WARNING: takes only size 1 along input axis 0" in report.summary()
    assert not [m for m in torch_notes.messages if "specialized" in m]  # torch.export's own note is not repeated


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("error", ["unit axes", "other"])
def test_a_size_of_one_the_graph_still_holds_is_exported_again_fixed(
    error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    checks = []

    def fails(*args: object, **kwargs: object) -> None:
        checks.append(1)
        if error == "unit axes":
            raise export_module._UnitAxesError("ONNX Runtime fails at the other size")
        raise ExportError("anything else that went wrong with sizes of 1 kept dynamic")  # the fixed export may pass

    if error == "unit axes":
        monkeypatch.setattr(export_module, "_check_example_itself", fails)  # captured from the example doubled
    else:  # one export fewer
        _no_doubled_capture(monkeypatch)
    monkeypatch.setattr(export_module, "_check_unit_axes", fails)  # captured with sizes of 1 kept dynamic
    ids = torch.randint(0, 128, (1, 8))
    with caplog.at_level(logging.WARNING):
        report = export_onnx(_two_btt_layers(), (ids,), tmp_path / "r.onnx")
    assert len(checks) == (2 if error == "unit axes" else 1) and report.checked  # the last export: at the example
    assert report.checked_shapes == [[1, 8]] and report.doubled_sizes == []
    assert report.fixed_sizes == ["input axis 0"] and _input_dims(tmp_path / "r.onnx")[0] == 1
    assert ("exporting again from the example itself" in caplog.text) == (error == "unit axes")
    assert "exporting again with those sizes fixed" in caplog.text


def test_a_model_pytorch_cannot_run_doubled_is_captured_from_the_example_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class OneBatch(nn.Module):  # reads the batch of one as the sequence: batch 2 is not a shape it takes
        def __init__(self) -> None:
            super().__init__()
            self.inner = _two_btt_layers()

        def forward(self, ids: Tensor) -> Tensor:
            return self.inner(ids.view(ids.shape[1]))  # (S,) -> (S, 64)

    with caplog.at_level(logging.INFO, logger="einrewrite"):
        report = export_onnx(OneBatch().eval(), (torch.randint(0, 128, (1, 8)),), tmp_path / "b.onnx")
    assert "PyTorch cannot run the example doubled along ids axis 0" in caplog.text  # so no capture from it
    assert "from the example doubled along" not in caplog.text
    assert report.doubled_sizes == [] and report.checked_shapes[0] == [1, 8]


class _ThreeInputs(nn.Module):
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **extra: Any) -> Tensor:
        return input_ids


def test_size_one_axes_are_named_by_input() -> None:
    ids, mask, pixels = torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8), torch.ones(1, 3, 1, 5)
    inputs = {"attention_mask": mask, "pixel_values": pixels, "flag": True}
    found = export_module._unit_axes(_ThreeInputs(), (ids,), inputs)
    # named as forward's parameters (keywords of **extra by their own name); ints: every axis; floats: all but last
    assert found == ["input_ids axis 0", "attention_mask axis 0", "pixel_values axis 0", "pixel_values axis 2"]
    unbound = export_module._unit_axes(_ThreeInputs(), (ids, mask, pixels), {})  # too many positional inputs
    assert unbound == ["input 0 axis 0", "input 1 axis 0", "input 2 axis 0", "input 2 axis 2"]
