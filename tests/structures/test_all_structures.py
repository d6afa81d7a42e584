"""Invariants every registered einsum structure keeps (style.md §3.9), parametrized over the registry."""

from __future__ import annotations

import json

import pytest
import torch

from einrewrite import STRUCTURES, EinsumLinear, EinsumSpec

SIZES = [(16, 16), (12, 36), (64, 8), (768, 768), (97, 97)]
UNPADDED_SIZES = [(16, 16), (12, 36), (64, 8)]
# Structures whose bound spec is an EinsumSpec (one dense weight); others have their own test module.
EINSUM_NAMES = sorted(n for n in STRUCTURES if isinstance(STRUCTURES[n].example().bind(16, 16), EinsumSpec))
OWN_TEST_MODULE = {"btt_moe": "tests/test_moe.py"}


def test_every_registry_key_is_covered() -> None:
    assert set(EINSUM_NAMES) | set(OWN_TEST_MODULE) >= set(STRUCTURES)
    assert {"dense", "low_rank", "kronecker", "tensor_train", "monarch", "btt", "einsum"} <= set(EINSUM_NAMES)


def _layer(name: str, d_in: int, d_out: int, *, dtype: torch.dtype = torch.float32) -> EinsumLinear:
    return EinsumLinear(STRUCTURES[name].example().bind(d_in, d_out), dtype=dtype)


@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_forward_equals_dense_weight(name: str, d_in: int, d_out: int) -> None:
    layer = _layer(name, d_in, d_out)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, d_in)
    expected = torch.nn.functional.linear(x, layer.to_dense(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert layer.to_dense().shape == (d_out, d_in)


@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_params_equal_counted_numel(name: str, d_in: int, d_out: int) -> None:
    layer = _layer(name, d_in, d_out)
    counted = sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    assert layer.spec.params == counted


@pytest.mark.parametrize(("d_in", "d_out"), UNPADDED_SIZES)
@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_rank_of_random_cores_equals_rank_bound(name: str, d_in: int, d_out: int) -> None:
    layer = _layer(name, d_in, d_out, dtype=torch.float64)
    assert int(torch.linalg.matrix_rank(layer.to_dense())) == layer.spec.rank_bound


@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_rank_bound_is_an_upper_bound_when_padded(name: str) -> None:
    layer = _layer(name, 97, 97, dtype=torch.float64)
    assert int(torch.linalg.matrix_rank(layer.to_dense())) <= layer.spec.rank_bound


@pytest.mark.parametrize(("d_in", "d_out"), UNPADDED_SIZES)
@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_projection_recovers_a_member_of_the_class_exactly(name: str, d_in: int, d_out: int) -> None:
    member = _layer(name, d_in, d_out)
    assert member.spec.padding == (0, 0)
    weight = member.to_dense().detach()
    projected = EinsumLinear.from_weight(weight, None, member.spec)
    assert projected.projection_error is not None and projected.projection_error < 1e-5
    torch.testing.assert_close(projected.to_dense(), weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("d_in", "d_out"), [*UNPADDED_SIZES, (97, 97)])
@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_projection_is_no_worse_than_random_members(name: str, d_in: int, d_out: int) -> None:
    weight = torch.randn(d_out, d_in)
    spec = STRUCTURES[name].example().bind(d_in, d_out)
    error = EinsumLinear.from_weight(weight, None, spec).projection_error
    assert error is not None
    for _ in range(5):
        member = EinsumLinear(spec).to_dense().detach()
        scale = (member * weight).sum() / (member * member).sum()  # best multiple of the member
        member_error = float(torch.linalg.matrix_norm(weight - scale * member) / torch.linalg.matrix_norm(weight))
        assert error <= member_error + 1e-6


@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_gradients_reach_every_core(name: str) -> None:
    layer = _layer(name, 12, 30)
    layer(torch.randn(4, 12)).square().sum().backward()
    for core_name in layer.core_names:
        grad = getattr(layer, core_name).grad
        assert grad is not None and grad.abs().sum() > 0, core_name


@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_spec_survives_json(name: str) -> None:
    spec = STRUCTURES[name].example().bind(12, 30)
    assert EinsumSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("name", EINSUM_NAMES)
def test_search_space_candidates_bind(name: str) -> None:
    bound = 0
    for candidate in STRUCTURES[name].search_space(48, 96):
        try:
            spec = candidate.bind(48, 96)
        except ValueError:
            continue
        bound += 1
        assert spec.name == name
    assert bound > 0 or name == "einsum"
