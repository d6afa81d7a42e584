"""The BTT-MoE export (einrewrite.moe_lowering): both token groupings equal the layer, route sparsely in ONNX
Runtime, give the same bits on every run and keep dynamic shapes."""

from __future__ import annotations

import ast
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import einrewrite as er
from einrewrite import export as export_module
from einrewrite import moe_lowering
from einrewrite.errors import ExportError
from einrewrite.lowering import is_lowered_weight
from einrewrite.moe import BTTMoELinear
from einrewrite.moe_lowering import MIN_SET_WIDTH, expert_sets, grouped_by_set, lowered_moe_forward

from models import moe_layer  # type: ignore[import-not-found]

GROUPINGS = ["set", "expert"]


def _groups(layer: BTTMoELinear, grouping: str) -> int:
    return math.comb(layer.num_experts, layer.top_k) if grouping == "set" else layer.num_experts


def test_expert_sets_are_the_k_subsets_up_to_the_limit() -> None:
    assert expert_sets(4, 2) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(expert_sets(8, 2) or []) == 28 and expert_sets(8, 1) == [(i,) for i in range(8)]
    assert expert_sets(3, 3) == [(0, 1, 2)]
    assert expert_sets(8, 3) is None and expert_sets(16, 2) is None  # 56 and 120 sets: grouped by expert


def test_auto_groups_by_set_only_wide_layers_and_bad_groupings_raise(tmp_path: Path) -> None:
    narrow, wide = BTTMoELinear(64, 96, num_experts=8), BTTMoELinear(512, 1536, num_experts=8)
    assert narrow.in_features + 2 * narrow.out_features < MIN_SET_WIDTH <= wide.in_features + 2 * wide.out_features
    assert grouped_by_set(narrow) is None and grouped_by_set(narrow, "expert") is None
    assert len(grouped_by_set(narrow, "set") or []) == 28 and len(grouped_by_set(wide) or []) == 28
    assert grouped_by_set(BTTMoELinear(512, 1536, num_experts=8, top_k=3), "set") is None  # 56 sets: by expert
    bad = {"moe_grouping": "sets"}
    with pytest.raises(ExportError, match="moe_grouping must be 'auto', 'set' or 'expert', got 'sets'"):
        er.export_onnx(narrow, (torch.randn(4, 64),), tmp_path / "m.onnx", **bad)  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="got 'pairs'"):  # the same check when the layer is lowered directly
        lowered_moe_forward(narrow, torch.randn(4, 64), "pairs")  # type: ignore[arg-type]


def _kernels_run(path: Path, x: Tensor) -> Counter[str]:
    """Op types of the kernels ONNX Runtime ran on ``x``, those inside an ``If``'s branch included (its profile)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x.numpy()})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return Counter(e["args"]["op_name"] for e in kernels)


def test_auto_on_a_wide_layer_chooses_the_grouping_by_token_count_when_the_model_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(moe_lowering, "MIN_SET_WIDTH", 0)  # this small layer counts as wide
    monkeypatch.setattr(moe_lowering, "MIN_SET_TOKENS", 32)
    layer = moe_layer(64, 96, experts=8, seed=5).eval()
    path = tmp_path / "moe.onnx"
    report = er.export_onnx(layer, (torch.randn(2, 8, 64),), path)
    # one If holding both groupings: a NonZero per expert (8) and per expert set (28) in its branches
    assert report.checked and report.op_counts["If"] == 1 and report.op_counts["NonZero"] == 8 + 28
    # the parity check also ran the by-set branch: the example's 16 tokens repeated to 32
    assert report.checked_shapes == [[2, 8, 64], [4, 8, 64]] and report.unchecked is None
    for tokens, groups in ((31, 8), (32, 28), (200, 28)):  # by expert below 32 tokens, by set from 32 on
        x = torch.randn(1, tokens, 64)
        assert _kernels_run(path, x)["NonZero"] == groups
        with torch.no_grad():
            torch.testing.assert_close(_run_ort(path, x), layer(x), rtol=1e-4, atol=1e-4)


def test_the_token_count_op_runs_the_by_set_grouping_from_its_threshold_on_and_by_expert_below() -> None:
    layer = moe_layer(64, 96, experts=8, seed=6).eval()
    weights = moe_lowering.export_weights(layer)
    members = [i for s in expert_sets(8, 2) or [] for i in s]
    sizes = [*[layer.spec.sizes[i] for i in (0, 2, 5, 4, 6)], 2]  # α, γ, φ, ε, E, k
    ops = torch.ops.einrewrite
    for tokens in (15, 16, 40):
        x = torch.randn(tokens, 64)
        index, gates = moe_lowering.route(layer.router(x), 2)  # (N, k) each
        code = (torch.tensor([1 << i for i in range(8)])[index]).sum(1)  # (N,)
        table = torch.zeros(tokens, 8).scatter(1, index, gates)  # (N, E)
        x3 = x.reshape(tokens, sizes[1], sizes[0])  # (N, γ, α)
        got = ops.moe_by_token_count(x3, code, table, index.reshape(-1), gates.reshape(-1), weights, members, sizes, 16)
        by_set = ops.moe_by_expert_set(x3, code, table, weights, members, sizes)
        by_expert = ops.moe_by_expert(x3, index.reshape(-1), gates.reshape(-1), weights, sizes)
        assert torch.equal(got, by_set if tokens >= 16 else by_expert)
        assert not torch.equal(by_set, by_expert)  # summed in another order: the two are told apart


def _scopes(node: object) -> list[str]:
    props = {p.key: p.value for p in node.metadata_props}  # type: ignore[attr-defined]
    return ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))


def test_two_layers_choosing_by_token_count_export_one_if_each_with_names_unique_in_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each ``If`` is written by the op's translation: its branches read the outer graph's values (input, gates,
    weights) and name theirs apart from every other value of the model, as ONNX requires; a second export in the
    same process writes the same file."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(moe_lowering, "MIN_SET_WIDTH", 0)
    monkeypatch.setattr(moe_lowering, "MIN_SET_TOKENS", 24)
    model = nn.Sequential(moe_layer(64, 96, experts=8, seed=7), nn.GELU(), moe_layer(96, 64, experts=8, seed=8)).eval()
    path = tmp_path / "moe.onnx"
    report = er.export_onnx(model, (torch.randn(3, 8, 64),), path)
    assert report.checked and report.op_counts["If"] == 2 and report.op_counts["NonZero"] == 2 * (8 + 28)
    proto = onnx.load(str(path))
    names, graphs = [], [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            names.extend(node.output)
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
    assert len(names) == len(set(names))
    onnx.checker.check_model(proto, full_check=True)
    for layer, node in zip(("0", "2"), (n for n in proto.graph.node if n.op_type == "If"), strict=True):
        for branch in (a.g for a in node.attribute):  # an error at any branch node names the If's layer
            assert not any(_scopes(n) for n in branch.node)  # from the If's metadata, not copies of it
            assert {export_module._located(str(path), n.name) for n in branch.node} == {
                f"{n.name!r} in layer {layer!r}" for n in branch.node
            }
    for tokens in (5, 24, 70):
        x = torch.randn(1, tokens, 64)
        with torch.no_grad():
            torch.testing.assert_close(_run_ort(path, x), model(x), rtol=1e-4, atol=1e-4)
    again = tmp_path / "again.onnx"
    er.export_onnx(model, (torch.randn(3, 8, 64),), again, check=False)
    assert again.read_bytes() == path.read_bytes()


class _RefusingSession:
    """An ONNX Runtime session stand-in that fails every run (e.g. a batch too large for the machine)."""

    def __init__(self, session: object) -> None:
        self.session = session

    def get_inputs(self) -> object:
        return self.session.get_inputs()  # type: ignore[attr-defined]

    def run(self, *_: object) -> object:
        raise RuntimeError("Failed to allocate memory for the larger batch")


def test_a_by_set_branch_the_check_cannot_run_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(moe_lowering, "MIN_SET_WIDTH", 0)
    monkeypatch.setattr(moe_lowering, "MIN_SET_TOKENS", 32)
    layer = moe_layer(64, 96, experts=8, seed=5).eval()
    example = (torch.randn(2, 8, 64),)
    report = er.export_onnx(layer, example, tmp_path / "moe.onnx")
    report.checked_shapes, report.unchecked = [], None
    session = _RefusingSession(er.export.onnxruntime_session(tmp_path / "moe.onnx"))
    er.export._check_by_set_branch(session, layer, example, {}, report, [16])  # the layer saw 2·8 tokens
    assert report.unchecked is not None and "repeated 2x" in report.unchecked and "allocate" in report.unchecked
    assert "WARNING: not checked: BTT-MoE grouping by expert set" in report.summary()


# (d_in, d_out, experts, k): padded input and cropped output (97), 3 experts, k = 1, k = 3, all experts picked
_LAYERS = [(97, 97, 4, 2), (40, 24, 3, 2), (64, 96, 8, 1), (64, 64, 4, 3), (32, 48, 4, 4)]


@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize(("d_in", "d_out", "experts", "k"), _LAYERS)
def test_lowered_forward_equals_the_layer_and_leaves_it_untouched(
    grouping: str, d_in: int, d_out: int, experts: int, k: int
) -> None:
    layer = moe_layer(d_in, d_out, experts=experts, k=k)
    state = {n: t.clone() for n, t in layer.state_dict().items()}
    x = torch.randn(3, 50, d_in)
    with torch.no_grad():
        torch.testing.assert_close(lowered_moe_forward(layer, x, grouping), layer(x), rtol=1e-5, atol=1e-5)
    assert layer.state_dict().keys() == state.keys() and not dict(layer.named_buffers())
    assert all(torch.equal(layer.state_dict()[n], t) for n, t in state.items())


def _ancestors(graph: object, name: str) -> set[str]:
    """Op types of every node the value ``name`` depends on."""
    producer = {out: node for node in graph.node for out in node.output}  # type: ignore[attr-defined]
    seen: set[str] = set()
    types: set[str] = set()
    stack = [name]
    while stack:
        value = stack.pop()
        node = producer.get(value)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        types.add(node.op_type)
        stack.extend(node.input)
    return types


def _check_sparse_graph(path: Path, groups: int, experts_per_group: int = 1) -> None:
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "Einsum" not in ops
    assert ops.count("NonZero") == groups and "Gather" in ops and "ScatterND" in ops
    # every group's experts run as MatMul pairs on its tokens (selected through NonZero), not the whole batch
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 * groups * experts_per_group
    assert all("NonZero" in _ancestors(graph, n.input[0]) | _ancestors(graph, n.input[1]) for n in matmuls)
    # the MatMuls read each expert's cores as stored: nothing (a per-set Concat) makes ONNX Runtime hold copies
    weights = {t.name for t in graph.initializer if is_lowered_weight(t.name)}
    readers = {n.op_type for n in graph.node for value in n.input if value in weights}
    assert weights and readers == {"MatMul"}, readers


def _run_ort(path: Path, x: Tensor) -> Tensor:
    session = er.export.onnxruntime_session(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_export_onnx_of_the_layer_runs_sparse_routing_in_onnxruntime(grouping: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    layer = moe_layer(40, 24, experts=4).eval()  # 40 -> 48 padded input, 24 = 4·6 output
    report = er.export_onnx(layer, (torch.randn(2, 8, 40),), tmp_path / "moe.onnx", moe_grouping=grouping)
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert not report.einsum_nodes
    _check_sparse_graph(tmp_path / "moe.onnx", _groups(layer, grouping), layer.top_k if grouping == "set" else 1)
    for shape in ((3, 5, 40), (1, 1, 40)):  # dynamic batch and sequence, including one token
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(_run_ort(tmp_path / "moe.onnx", x), layer(x), rtol=1e-4, atol=1e-4)


def test_export_onnx_of_a_model_with_moe_layers(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), moe_layer(64, 32, seed=2, experts=3), nn.LayerNorm(32)).eval()
    report = er.export_onnx(model, (torch.randn(4, 32),), tmp_path / "model.onnx")  # narrow: by expert
    assert report.checked and not report.einsum_nodes
    _check_sparse_graph(tmp_path / "model.onnx", 3)
    x = torch.randn(9, 32)
    with torch.no_grad():
        torch.testing.assert_close(_run_ort(tmp_path / "model.onnx", x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_the_outputs_return_to_token_order_in_one_gather_without_a_transpose(grouping: str, tmp_path: Path) -> None:
    """The grouped outputs (φ, m, ε) reach (N, φ, ε) through one Gather of ε rows: ORT's optimized graph keeps no
    Transpose of activations (those before the MatMuls fuse into FusedMatMul), only the gate table's."""
    import onnx
    import onnxruntime as ort

    layer = moe_layer(64, 96, experts=8, seed=5).eval()
    path = tmp_path / "moe.onnx"
    er.export_onnx(layer, (torch.randn(2, 8, 64),), path, moe_grouping=grouping)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    perms = [list(a.ints) for n in graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
    assert all(p == [1, 0] for p in perms), perms  # by set: the gate table (N, E) -> (E, N)
    assert any(n.op_type == "FusedMatMul" for n in graph.node)  # the experts' input permutes, fused
    producer = {out: n for n in graph.node for out in n.output}
    last = producer[graph.output[0].name]
    while last.op_type != "Gather":  # back from the output through the bias, the reshape and the k-sum
        assert last.op_type in ("Add", "Reshape", "Slice"), last.op_type  # bias, crop, the k slots' sum
        last = producer[last.input[0]]
    assert producer[last.input[0]].op_type == "Reshape"  # the grouped outputs seen as (φ·L, ε) rows


def _check_parity_and_repeats(layer: BTTMoELinear, path: Path, grouping: str) -> None:
    """ORT on 2 threads matches the layer on 1,200 tokens and gives the same bits on 5 more runs."""
    layer.eval()
    er.export_onnx(layer, (torch.randn(2, 7, layer.in_features),), path, moe_grouping=grouping)
    session = er.export.onnxruntime_session(path, threads=2)
    x = torch.randn(4, 300, layer.in_features)  # big enough for ORT to split kernels over threads
    feeds = {session.get_inputs()[0].name: x.numpy()}
    first = session.run(None, feeds)[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(first), layer(x), rtol=1e-4, atol=1e-4)
    for _ in range(5):  # no ScatterND(add) over duplicate indices anywhere: runs agree bit for bit
        np.testing.assert_array_equal(session.run(None, feeds)[0], first)


@pytest.mark.parametrize(("experts", "k"), [(8, 2), (4, 3), (6, 1)])
def test_export_by_expert_set_matches_and_repeats_bitwise(experts: int, k: int, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    layer = moe_layer(64, 96, experts=experts, k=k, seed=4)
    assert expert_sets(experts, k) is not None
    _check_parity_and_repeats(layer, tmp_path / "moe.onnx", "set")


@pytest.mark.parametrize("optimize", [None, False])
@pytest.mark.parametrize(("d_in", "d_out"), [(64, 96), (512, 1024)])  # cores under / over onnxscript's fold limit
@pytest.mark.parametrize("grouping", GROUPINGS)
def test_the_exported_file_holds_each_expert_once(
    grouping: str, d_in: int, d_out: int, optimize: bool | None, tmp_path: Path
) -> None:
    import onnx

    layer = BTTMoELinear(d_in, d_out, num_experts=8, top_k=2).eval()
    path = tmp_path / "moe.onnx"
    report = er.export_onnx(layer, (torch.randn(2, 8, d_in),), path, moe_grouping=grouping, optimize=optimize)
    assert report.checked and report.op_counts["Equal"] == _groups(layer, grouping)
    proto = onnx.load(str(path))  # with the external data
    stored = sum(math.prod(t.dims) for t in proto.graph.initializer)
    params = sum(p.numel() for p in layer.parameters())
    # grouped by set, every expert is in 7 of the 28 sets: its cores stacked per set would store 7x the params
    assert params <= stored <= 1.05 * params, (stored, params)


# Grouped by expert, the gates apply on the narrowest of input γα, intermediate γφ and output φε:
# (d_in, d_out, in_split, out_split, top_k), one case each, and k = 3 for the slot-major gather with k > 2.
_GATE_CASES = {
    "input": (16, 96, 0.5, 0.5, 2),
    "middle": (64, 64, 0.75, 0.75, 3),
    "output": (96, 20, 0.5, 0.5, 2),
}


@pytest.mark.parametrize("where", sorted(_GATE_CASES))
def test_export_by_expert_matches_and_repeats_bitwise_wherever_the_gates_apply(where: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    d_in, d_out, in_split, out_split, k = _GATE_CASES[where]
    layer = moe_layer(d_in, d_out, k=k, seed=3, in_split=in_split, out_split=out_split)
    a, _, g, _, e, f, _ = layer.spec.sizes
    widths = {"input": g * a, "middle": g * f, "output": f * e}
    assert min(widths, key=widths.__getitem__) == where, widths  # the case really gates there
    _check_parity_and_repeats(layer, tmp_path / "moe.onnx", "expert")


@pytest.mark.parametrize("grouping", GROUPINGS)
def test_export_onnx_in_float16_runs_on_the_cpu_provider(grouping: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    layer = moe_layer(64, 96, experts=4).eval()
    report = er.export_onnx(
        layer, (torch.randn(2, 8, 64),), tmp_path / "half.onnx", dtype="float16", moe_grouping=grouping
    )
    assert report.checked and report.dtype == "float16"
    assert report.max_abs_diff is not None and 0 < report.max_abs_diff < 2e-2  # fp16 rounding, not fp32 equality
