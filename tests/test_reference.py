"""The paper's two-einsum formulation (einrewrite.reference) as an independent oracle for EinsumLinear."""

from __future__ import annotations

import pytest
import torch

from einrewrite import STRUCTURES, EinsumLinear, EinsumSpec
from einrewrite.reference import paper_cores, reference_forward

SIZES = [(16, 16), (12, 30), (64, 8), (768, 768), (97, 97)]
# Every structure with a single weight (MoE layers have their own module and tests).
NAMES = sorted(n for n in STRUCTURES if isinstance(STRUCTURES[n].example().bind(16, 16), EinsumSpec))


def _layer(name: str, d_in: int, d_out: int) -> EinsumLinear:
    layer = EinsumLinear(STRUCTURES[name].example().bind(d_in, d_out), dtype=torch.float64)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def test_the_matrix_covers_the_registry() -> None:
    assert {"dense", "low_rank", "kronecker", "tensor_train", "monarch", "btt", "einsum"} <= set(NAMES)
    assert all(n in NAMES or n.endswith("moe") for n in STRUCTURES)


@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_reference_equals_layer(name: str, d_in: int, d_out: int) -> None:
    layer = _layer(name, d_in, d_out)
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    expected = reference_forward(x, layer)
    assert expected.shape == (2, 3, d_out)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.nn.functional.linear(x, layer.to_dense(), layer.bias), expected)


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"dense"}))
def test_gradients_match_the_reference(name: str) -> None:
    layer = _layer(name, 12, 30)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(7, 30, dtype=torch.float64)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad(layer(x), params, grad_out)
    theirs = torch.autograd.grad(reference_forward(x, layer), params, grad_out)
    for got, want in zip(ours, theirs, strict=True):
        assert got.abs().sum() > 0  # every core receives a gradient
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_paper_layout_of_the_cores() -> None:
    layer = EinsumLinear(STRUCTURES["einsum"].example().bind(64, 64))
    a, b, g, d, e, f, r = layer.spec.sizes
    a_core, b_core = paper_cores(layer)
    assert a_core.shape == (f, d, r, g, a) and b_core.shape == (f, e, r, g, b)
    assert a_core[1, 0, 0, 2, 3] == layer.A[2, 0, 1, 0, 3]  # A[γ, ρ, φ, δ, α] -> A[φ, δ, ρ, γ, α]
    assert b_core[1, 2, 0, 1, 0] == layer.B[1, 2, 1, 0, 0]  # B[φ, ε, γ, ρ, β] -> B[φ, ε, ρ, γ, β]


def test_dense_layer_has_no_paper_cores() -> None:
    layer = EinsumLinear(STRUCTURES["dense"].example().bind(8, 8))
    with pytest.raises(ValueError, match="is dense"):
        paper_cores(layer)
    x = torch.randn(3, 8)
    torch.testing.assert_close(reference_forward(x, layer), layer(x))
