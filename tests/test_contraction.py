"""Contraction planning and execution: plans per token bucket, no activation copies, bmm only, gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from einrewrite import STRUCTURES, EinsumLinear, EinsumSpec, structure
from einrewrite.contraction import btt_forward, plan_contraction, run, token_bucket

NAMES = sorted(n for n in STRUCTURES if isinstance(STRUCTURES[n].example().bind(16, 16), EinsumSpec))
# Structures whose programs the planner proves copy-free for a row-major (331, 1024) input. (With blocks of 8,
# Kronecker's training plan copies the output gradient once: cheaper than a GEMM per token of 8x8 blocks.)
COPY_FREE = [
    ("monarch", {}),
    ("btt", {"rank": 1}),
    ("btt", {"rank": 3}),
    ("low_rank", {"rank": 32}),
    ("kronecker", {}),
    ("tensor_train", {"rank": 2}),
]


class _OpLog(TorchDispatchMode):
    """Records (op name, output numel) of every aten op, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        numel = out.numel() if isinstance(out, torch.Tensor) else 0
        self.ops.append((str(func.overloadpacket.__name__), numel))
        return out


def _ops(fn: Callable[[], object]) -> list[tuple[str, int]]:
    with _OpLog() as log:
        fn()
    return log.ops


def test_token_buckets_are_powers_of_two() -> None:
    assert [token_bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]


def test_plans_are_cached_per_bucket_layout_and_mode() -> None:
    spec = structure("kronecker", 256, 256)
    assert plan_contraction(spec, 3000) is plan_contraction(spec, 4096)
    assert plan_contraction(spec, 4096) is not plan_contraction(spec, 4097)
    assert plan_contraction(spec, 64) is not plan_contraction(spec, 64, layout="feature")
    assert plan_contraction(spec, 64) is not plan_contraction(spec, 64, grad=True)
    assert plan_contraction(spec, 4097).tokens == 8192


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"dense"}))
def test_cost_is_the_flops_of_the_chosen_activation_first_order(name: str) -> None:
    spec = STRUCTURES[name].example().bind(96, 160)
    for tokens in (1, 512):
        plan = plan_contraction(spec, tokens)
        assert plan.order in ("xA", "xB")
        assert plan.cost == 2 * spec.macs_by_order[plan.order]  # opt_einsum counts 2 FLOPs per MAC
        assert plan.total_cost >= tokens * plan.cost
        assert plan.steps[0].startswith("ngba,")  # the input takes part in the first contraction
        assert plan.kind in plan.describe() and f"{plan.cost:,} FLOPs/token" in plan.describe()


def test_describe_names_the_layout_of_each_step() -> None:
    monarch = plan_contraction(structure("monarch", 1024, 1024), 4096)
    assert monarch.kind == "bmm"
    assert monarch.describe().startswith("bmm xA feature-major: [γ]A(ρφ×α)·(α×N) ; [φ]B(ε×γρ)·(γρ×N)")
    kron = plan_contraction(structure("kronecker", 1024, 1024), 4096)
    assert kron.kind == "matmul" and kron.copied_per_token == 0 and len(kron.stages) == 2
    assert "copied/token" in kron.describe()


@pytest.mark.parametrize(("name", "hyper"), COPY_FREE)
@pytest.mark.parametrize("mode", ["forward", "training"])
def test_no_activation_is_copied(name: str, hyper: dict[str, int], mode: str) -> None:
    """Copy ops may touch weights (core-sized), never anything the size of the activations."""
    tokens, d = 331, 1024  # a prime: activations have a multiple of it as numel, cores never do
    layer = EinsumLinear(structure(name, d, d, **hyper))
    x = torch.randn(tokens, d, requires_grad=mode == "training")
    grad_out = torch.randn(tokens, d)
    plan = plan_contraction(layer.spec, tokens, grad=mode == "training")
    assert plan.copied_per_token == 0, plan.describe()

    def step() -> None:
        if mode == "training":
            torch.autograd.grad(layer(x), [x, *layer.parameters()], grad_out)
        else:
            with torch.no_grad():
                layer(x)

    step()  # plans once
    copying = ("copy_", "clone", "_to_copy", "contiguous")
    copies = [(op, n) for op, n in _ops(step) if op in copying and n > 0 and n % tokens == 0]
    assert copies == [], plan.describe()


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"dense"}))
def test_structured_layers_run_on_bmm_never_einsum(name: str) -> None:
    layer = EinsumLinear(STRUCTURES[name].example().bind(48, 40))
    x = torch.randn(33, 48, requires_grad=True)
    ops = {op for op, _ in _ops(lambda: layer(x).sum().backward())}
    assert "bmm" in ops
    assert "einsum" not in ops


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"dense"}))
@pytest.mark.parametrize("tokens", [1, 2, 17])
def test_gradcheck(name: str, tokens: int) -> None:
    layer = EinsumLinear(STRUCTURES[name].example().bind(12, 10), dtype=torch.float64)
    x = torch.randn(tokens, 12, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def fn(inp: torch.Tensor, *cores: torch.Tensor) -> torch.Tensor:
        named = dict(zip(layer.core_names, cores[: len(layer.core_names)], strict=True))
        return run(layer.spec, layer.plan, inp, named, cores[-1])

    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)


@pytest.mark.parametrize("rank", [1, 3])
def test_btt_kernel_gradients_equal_the_dense_layer(rank: int) -> None:
    layer = EinsumLinear(structure("btt", 96, 80, rank=rank), dtype=torch.float64)
    x = torch.randn(2, 9, 96, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 9, 80, dtype=torch.float64)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad(layer(x), params, grad_out)
    dense = torch.autograd.grad(torch.nn.functional.linear(x, layer.to_dense(), layer.bias), params, grad_out)
    for got, want in zip(ours, dense, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["btt", "kronecker", "tensor_train", "einsum"])
def test_feature_major_inputs_and_chained_layers(name: str) -> None:
    first = EinsumLinear(STRUCTURES[name].example().bind(64, 48), dtype=torch.float64)
    second = EinsumLinear(STRUCTURES[name].example().bind(48, 40), dtype=torch.float64)
    x = torch.randn(300, 64, dtype=torch.float64)
    h = first(x)
    feature_major = h.t().contiguous().t()  # same values, transposed memory
    expected = torch.nn.functional.linear(h, second.to_dense(), second.bias)
    torch.testing.assert_close(second(h), expected)
    torch.testing.assert_close(second(feature_major), expected)
    torch.testing.assert_close(
        second(x[:, ::2].repeat(1, 2)[:, :48]), second(x[:, ::2].repeat(1, 2)[:, :48].contiguous())
    )


def test_one_token_and_empty_batches() -> None:
    layer = EinsumLinear(structure("kronecker", 64, 64))
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.to_dense(), layer.bias))
    assert layer(torch.randn(0, 64)).shape == (0, 64)


@pytest.mark.parametrize("name", ["btt", "tensor_train"])
def test_torch_compile_trains(name: str) -> None:
    torch._dynamo.reset()
    layer = EinsumLinear(STRUCTURES[name].example().bind(64, 48))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(5, 7, 64, requires_grad=True)
    grad_out = torch.randn(5, 7, 48)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(compiled(x), params, grad_out)
    want = torch.autograd.grad(layer(x), params, grad_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["btt", "kronecker"])
def test_bf16_autocast_trains(name: str) -> None:
    layer = EinsumLinear(STRUCTURES[name].example().bind(64, 64))
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in layer.parameters()
    )
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(("d_in", "d_out", "rank"), [(64, 64, 1), (96, 80, 2), (100, 70, 3)])
def test_btt_forward_folds_the_bias_into_the_second_matmul(d_in: int, d_out: int, rank: int) -> None:
    spec = structure("btt", d_in, d_out, rank=rank)
    layer = EinsumLinear(spec)
    with torch.no_grad():
        layer.bias.normal_()
        x = torch.nn.functional.pad(torch.randn(37, d_in), (0, spec.sizes.in_size - d_in))  # (37, in_size)
        folded = btt_forward(x, layer.A, layer.B, spec, bias=layer.bias)[:, :d_out]
        plain = btt_forward(x, layer.A, layer.B, spec)[:, :d_out] + layer.bias
        expected = torch.nn.functional.linear(x[:, :d_in], layer.to_dense(), layer.bias)
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)
