"""Feature-major handoff: a BTT-family layer's output reaches the next layer without its token-order Gather."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import Tensor, nn

from einrewrite import EinsumLinear, export_onnx, structure
from einrewrite.export import onnxruntime_session

import models  # type: ignore[import-not-found]  # tests/models.py


class _Mlp(nn.Module):
    def __init__(self, name: str, act: nn.Module, hidden: int = 256, **hyper: int) -> None:
        super().__init__()
        self.fc1 = EinsumLinear(structure(name, 64, hidden, **hyper))
        self.act = act
        self.fc2 = EinsumLinear(structure(name, hidden, 64))
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.bias.normal_()  # a bias the handoff must rearrange to (φ, 1, ε)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Scaled(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x * 1.5) - 0.25  # scalars on either side of the chain's value


class _Gated(_Mlp):
    def __init__(self) -> None:
        super().__init__("btt", nn.SiLU())
        self.up = EinsumLinear(structure("btt", 64, 256))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)) * self.up(x))  # two layers meet, as in Llama's MLP


class _ReadTwice(_Mlp):
    def __init__(self) -> None:
        super().__init__("btt", nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h) + h.mean(-1, keepdim=True)  # the hidden layer has another reader


def _gathers(path: Path) -> int:
    return sum(n.op_type == "Gather" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _runs_like_torch(model: nn.Module, path: Path) -> None:
    session = onnxruntime_session(path)
    with torch.no_grad():
        for shape in [(3, 7, 64), (1, 1, 64)]:  # other shapes than the export's: dynamic
            x = torch.randn(*shape)
            (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


_MATCHED = {"btt": {}, "monarch": {"blocks": 16}}  # fc1's output factors (φ, ε) = fc2's input factors (γ, α)


@pytest.mark.parametrize("name", sorted(_MATCHED))
@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU(), _Scaled()], ids=["gelu", "relu", "scaled_sigmoid"])
def test_an_mlp_hands_its_hidden_layer_over_feature_major(name: str, act: nn.Module, tmp_path: Path) -> None:
    model = _Mlp(name, act, **_MATCHED[name]).eval()
    assert model.fc1.spec.sizes.phi == model.fc2.spec.sizes.gamma
    path = tmp_path / "mlp.onnx"
    report = export_onnx(model, (torch.randn(2, 5, 64),), path)  # checked against PyTorch in ONNX Runtime
    assert report.handoffs == ["fc1 -> fc2"]
    assert _gathers(path) == 1  # fc2's own token-order Gather; fc1's is gone
    assert "1 layer outputs handed to the next layer feature-major" in report.summary()
    _runs_like_torch(model, path)


def test_a_gated_mlp_hands_both_layers_over(tmp_path: Path) -> None:
    model = _Gated().eval()
    path = tmp_path / "gated.onnx"
    report = export_onnx(model, (torch.randn(2, 5, 64),), path)
    assert report.handoffs == ["fc1 -> fc2", "up -> fc2"]  # silu(fc1(x)) * up(x): x·sigmoid(x), then a product
    assert _gathers(path) == 1
    _runs_like_torch(model, path)


@pytest.mark.parametrize("model", [_ReadTwice(), _Mlp("monarch", nn.GELU(), blocks=8)],
                         ids=["read_twice", "other_factors"])
def test_a_hidden_layer_that_is_not_a_chain_keeps_its_gather(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    report = export_onnx(model.eval(), (torch.randn(2, 5, 64),), path)
    assert report.handoffs == []
    _runs_like_torch(model, path)


def test_without_the_optimizer_there_is_no_handoff(tmp_path: Path) -> None:
    model = _Mlp("btt", nn.GELU()).eval()
    report = export_onnx(model, (torch.randn(2, 5, 64),), tmp_path / "plain.onnx", optimize=False)
    assert report.handoffs == [] and _gathers(tmp_path / "plain.onnx") >= 2


def test_layers_whose_biases_the_optimizer_merged_each_hand_off(tmp_path: Path) -> None:
    model = nn.Sequential(_Mlp("btt", nn.GELU()), _Mlp("btt", nn.GELU())).eval()
    with torch.no_grad():
        for mlp in model:
            mlp.fc1.bias.fill_(0.5)  # equal biases: the optimizer keeps one initializer for both
    path = tmp_path / "two.onnx"
    report = export_onnx(model, (torch.randn(2, 5, 64),), path)
    # and the first MLP's output feeds the second one directly: a handoff with nothing between
    assert report.handoffs == ["0.fc1 -> 0.fc2", "0.fc2 -> 1.fc1", "1.fc1 -> 1.fc2"]
    _runs_like_torch(model, path)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hugging_face_mlps_hand_off(name: str, tmp_path: Path) -> None:
    """Llama's SwiGLU (two layers into one) and GPT-2's tanh GELU, written out in eight ops, rewritten to BTT."""
    from einrewrite import FlopBudget, RewriteConfig, rewrite

    factory = {"llama": models.tiny_llama, "gpt2": models.tiny_gpt2}[name]
    inputs = {**models.token_ids(2, 8), "use_cache": False}
    new, _ = rewrite(factory(), RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.5)), inputs)
    report = export_onnx(new, (), tmp_path / f"{name}.onnx", example_kwargs=inputs)  # checked against PyTorch
    mlp = {"llama": "model.layers.{}.mlp.{}", "gpt2": "transformer.h.{}.mlp.{}"}[name]
    pairs = {"llama": [("gate_proj", "down_proj"), ("up_proj", "down_proj")], "gpt2": [("c_fc", "c_proj")]}[name]
    assert report.handoffs == [f"{mlp.format(i, a)} -> {mlp.format(i, b)}" for i in range(2) for a, b in pairs]
