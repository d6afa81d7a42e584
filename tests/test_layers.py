"""EinsumLinear as a drop-in for nn.Linear: dtypes, devices, autocast, compile, from_linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from einrewrite import EinsumLinear, StructureMismatchError, structure
from einrewrite.init import mup_std


def test_nn_linear_attributes_and_leading_dims() -> None:
    layer = EinsumLinear(structure("btt", 64, 48, rank=2))
    assert (layer.in_features, layer.out_features) == (64, 48)
    assert layer(torch.randn(64)).shape == (48,)
    assert layer(torch.randn(2, 3, 4, 64)).shape == (2, 3, 4, 48)
    assert layer(torch.randn(0, 64)).shape == (0, 48)


def test_wrong_input_width_is_a_clear_error() -> None:
    layer = EinsumLinear(structure("monarch", 64, 64))
    with pytest.raises(RuntimeError, match="expects inputs with 64 features.*got shape \\(3, 63\\)"):
        layer(torch.randn(3, 63))


def test_constructor_refuses_a_non_spec() -> None:
    with pytest.raises(StructureMismatchError, match="needs an EinsumSpec"):
        EinsumLinear("btt")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["monarch", "kronecker"])
def test_follows_dtype(name: str) -> None:
    layer = EinsumLinear(structure(name, 64, 64)).to(torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.to_dense(), layer.bias))


@pytest.mark.parametrize("name", ["btt", "tensor_train", "dense"])
def test_autocast_bf16_matches_fp32_loosely(name: str) -> None:
    layer = EinsumLinear(structure(name, 64, 64))
    x = torch.randn(8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


def test_torch_compile_runs_and_matches() -> None:
    layer = EinsumLinear(structure("btt", 64, 32, rank=2))
    compiled = torch.compile(layer)
    x = torch.randn(6, 64)
    torch.testing.assert_close(compiled(x), layer(x))


def test_from_linear_projects_and_keeps_bias() -> None:
    linear = nn.Linear(32, 24)
    layer = EinsumLinear.from_linear(linear, structure("low_rank", 32, 24, rank=24))
    assert layer.projection_error is not None and layer.projection_error < 1e-5
    x = torch.randn(7, 32)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias, linear.bias)


def test_from_linear_binds_a_structure_instance() -> None:
    from einrewrite.structures import BTT

    layer = EinsumLinear.from_linear(nn.Linear(64, 64, bias=False), BTT(rank=2))
    assert layer.spec.hyper_dict["rank"] == 2 and layer.bias is None
    assert 0 < layer.projection_error < 1  # a random dense matrix is not a rank-2 BTT


def test_from_linear_refuses_a_spec_of_another_shape() -> None:
    with pytest.raises(StructureMismatchError, match="bound to 64->64 but the weight is 32->24"):
        EinsumLinear.from_linear(nn.Linear(32, 24), structure("monarch", 64, 64))


def test_mup_init_scale_and_zero_last() -> None:
    spec = structure("btt", 1024, 1024, rank=2)
    layer = EinsumLinear.from_linear(nn.Linear(1024, 1024), spec, init="mup", zero_last=True)
    fan_in, fan_out = spec.core_fans["A"]
    assert layer.A.std().item() == pytest.approx(mup_std(fan_in, fan_out), rel=0.05)
    assert torch.count_nonzero(layer.B) == 0
    assert layer.projection_error is None


def test_mup_std_formula() -> None:
    assert mup_std(64, 64) == pytest.approx(1 / 8)
    assert mup_std(64, 16) == pytest.approx(1 / 8 * 0.5)
    assert mup_std(16, 64) == pytest.approx(1 / 4)


def test_repr_reports_costs() -> None:
    text = repr(EinsumLinear(structure("monarch", 1024, 1024)))
    assert "monarch(blocks=32)" in text and "macs=65,536" in text
