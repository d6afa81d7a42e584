"""The ONNX lowering: same operator as the eager forward, MatMul chains only, dynamic shapes, clean context."""

from __future__ import annotations

import itertools
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from einrewrite import STRUCTURES, EinsumLinear, EinsumSpec, export_onnx, structure
from einrewrite.export import onnxruntime_session
from einrewrite.lowering import lowered_forward, lowering_plan, onnx_lowering

EINSUM_NAMES = sorted(n for n in STRUCTURES if isinstance(STRUCTURES[n].example().bind(16, 16), EinsumSpec))
SHAPES = [(24, 40), (97, 97), (64, 16), (16, 64), (128, 96)]  # rectangular both ways, padded (97)


def _layer(spec: EinsumSpec) -> EinsumLinear:
    layer = EinsumLinear(spec)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # non-zero bias, cores of unit scale
    return layer


def _ops(path: Path) -> list[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return [n.op_type for n in proto.graph.node] + [n.op_type for f in proto.functions for n in f.node]


def test_registry_is_covered() -> None:
    assert {"monarch", "btt", "low_rank", "kronecker", "tensor_train", "einsum"} <= set(EINSUM_NAMES)


@pytest.mark.parametrize("name", EINSUM_NAMES)
@pytest.mark.parametrize(("d_in", "d_out"), SHAPES)
def test_lowered_forward_equals_eager(name: str, d_in: int, d_out: int) -> None:
    layer = _layer(STRUCTURES[name].example().bind(d_in, d_out))
    with torch.no_grad():
        for shape in [(3, 7, d_in), (5, d_in), (2, 1, 1, d_in)]:
            x = torch.randn(*shape)
            got = lowered_forward(layer, x)
            assert got.shape == (*shape[:-1], d_out)
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, F.linear(x, layer.to_dense(), layer.bias), rtol=1e-4, atol=1e-4)


def test_every_axis_pattern_and_both_orders_match_the_dense_operator() -> None:
    """All small size patterns (axes of size 1 dropped or not, padded or not, xA or xB cheaper)."""
    orders = set()
    checked = 0
    for sizes in itertools.product([1, 2, 3], [1, 2], [1, 2], [1, 2], [1, 3], [1, 2], [1, 2]):
        a, b, g, d, e, f, _ = sizes
        for pad in (0, 1):
            d_in, d_out = max(1, a * b * g - pad), max(1, d * e * f - pad)
            try:
                spec = EinsumSpec.from_sizes(sizes, d_in, d_out, name="einsum", pad_tolerance=0.9)
            except ValueError:
                continue  # outside the θ space
            if spec.is_dense:
                continue  # a plain Linear, tested below
            layer = _layer(spec)
            x = torch.randn(4, d_in)
            with torch.no_grad():
                expected = F.linear(x, layer.to_dense(), layer.bias)
                torch.testing.assert_close(lowered_forward(layer, x), expected, rtol=1e-4, atol=1e-4)
            orders.add(lowering_plan(spec).order)
            checked += 1
    assert checked > 150 and orders == {"xA", "xB"}


def test_dense_spec_is_a_plain_linear() -> None:
    layer = _layer(structure("dense", 12, 20))
    x = torch.randn(3, 12)
    torch.testing.assert_close(lowered_forward(layer, x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="dense"):
        lowering_plan(layer.spec)


def test_btt_plan_weights_are_in_matmul_layout() -> None:
    plan = lowering_plan(structure("btt", 1024, 4096, rank=2))
    assert plan.order == "xA"
    assert [s.weight_shape for s in plan.stages] == [(32, 128, 32), (64, 64, 64)]  # (γ, ρφ, α), (φ, γρ, ε)
    assert [s.labels for s in plan.stages] == ["grfn", "fne"]  # feature-major, then the tokens before ε
    assert [s.tokens_first for s in plan.stages] == [False, True]
    assert plan.stages[0].rearrange.perm == (1, 2, 0)  # (N, γ, α) -> (γ, α, N)
    assert plan.stages[1].rearrange.perm == (1, 0, 2)  # (γρ, φ, N) -> (φ, γρ, N), read transposed
    assert plan.output_rows and not plan.output_feature_major  # (φ, N, ε) -> (N, φε): one Gather of ε-rows


def test_only_a_last_stage_with_the_tokens_alone_beside_its_contraction_puts_them_first() -> None:
    low_rank = lowering_plan(structure("low_rank", 64, 96, rank=4))
    assert [s.tokens_first for s in low_rank.stages] == [False, True] and not low_rank.output_rows  # (N, K)@(K, F)
    assert low_rank.stages[1].weight_shape == (4, 96)
    kronecker = lowering_plan(structure("kronecker", 64, 96))  # δ beside the tokens: the output stays transposed
    assert not any(s.tokens_first for s in kronecker.stages) and kronecker.output_feature_major


@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_export_has_no_einsum_and_runs_at_other_shapes(name: str, tmp_path: Path) -> None:
    layer = _layer(STRUCTURES[name].example().bind(97, 40))
    path = tmp_path / "layer.onnx"
    report = export_onnx(layer, (torch.randn(2, 5, 97),), path)
    ops = _ops(path)
    products = ops.count("MatMul") + ops.count("Gemm")  # a dense layer with bias exports as one Gemm
    assert "Einsum" not in ops and products == (1 if layer.spec.is_dense else 2)
    if not layer.spec.is_dense:
        proto = onnx.load(str(path), load_external_data=False)
        initializers = {i.name for i in proto.graph.initializer}
        operands = [set(n.input) for n in proto.graph.node if n.op_type == "MatMul"]
        assert all(len(op & initializers) == 1 for op in operands), "each MatMul reads a pre-arranged initializer"
        assert not initializers & {"A", "B"}, "the unarranged cores are not shipped"
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    session = onnxruntime_session(path)
    with torch.no_grad():
        for shape in [(3, 11, 97), (1, 1, 97)]:
            x = torch.randn(*shape)
            (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "gathers"), [("monarch", 1), ("btt", 1), ("low_rank", 0)])
def test_btt_family_runs_as_two_fused_matmuls_and_no_transpose(name: str, gathers: int, tmp_path: Path) -> None:
    """ORT folds every activation permute into FusedMatMul; the only copy is one Gather of ε-rows putting the
    (φ, N, ε) output in token order (low_rank's (N, ε) needs none, and its last MatMul and bias become a Gemm)."""
    import onnxruntime as ort

    layer = _layer(STRUCTURES[name].example().bind(64, 96))
    path = tmp_path / "layer.onnx"
    export_onnx(layer, (torch.randn(4, 64),), path, check=False)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = _ops(tmp_path / "optimized.onnx")
    assert ops.count("Transpose") == 0 and ops.count("Gather") == gathers
    products = ops.count("FusedMatMul") + ops.count("MatMul") + ops.count("Gemm")  # low_rank's last takes the bias
    assert products == 2 and ops.count("FusedMatMul") >= 1


def test_two_dimensional_input_is_dynamic(tmp_path: Path) -> None:
    layer = _layer(structure("monarch", 97, 97))
    path = tmp_path / "m.onnx"
    export_onnx(layer, (torch.randn(4, 97),), path)
    session = onnxruntime_session(path)
    x = torch.randn(9, 97)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-4, atol=1e-4)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = EinsumLinear(structure("btt", 32, 64, rank=2))
        self.fc2 = EinsumLinear(structure("kronecker", 64, 32))
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(F.gelu(self.fc1(x))))


def test_context_lowers_nested_layers_and_restores_everything() -> None:
    model = _Block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = model(x)
        with onnx_lowering(model) as lowered:
            assert lowered is model
            assert "forward" in vars(model.fc1) and "forward" in vars(model.fc2)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(model.fc1) and "forward" not in vars(model.fc2)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("onnx_lowered" in name for name, _ in model.named_buffers())


def test_context_restores_on_error() -> None:
    model = _Block()
    with pytest.raises(RuntimeError, match="boom"), onnx_lowering(model):
        raise RuntimeError("boom")
    assert "forward" not in vars(model.fc1)
    assert not any("onnx_lowered" in name for name, _ in model.named_buffers())


def test_wrong_feature_count_names_the_layer() -> None:
    layer = _layer(structure("btt", 32, 64, rank=2))
    with pytest.raises(RuntimeError, match=r"expects inputs with 32 features"):
        lowered_forward(layer, torch.randn(2, 31))
