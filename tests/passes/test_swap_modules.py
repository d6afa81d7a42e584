"""The module path: nn.Linear and HF Conv1D swapped for structured modules in an eager model."""

from __future__ import annotations

import torch
from torch import nn

import einrewrite as er
from einrewrite import EinsumLinear, FlopBudget, RewriteConfig
from einrewrite.passes import DEFAULT_PIPELINE, PassContext, find_targets, size_targets, swap_modules
from einrewrite.structures import LowRank

from models import low_rank_mlp, tiny_gpt, tiny_gpt2  # type: ignore[import-not-found]


def test_pipeline_is_an_explicit_ordered_tuple() -> None:
    names = [p.__name__ for p in DEFAULT_PIPELINE]
    assert names == ["find_targets", "trace_model", "size_targets", "swap_modules", "replace_linear", "verify_rewrite"]


def test_swap_keeps_trainability_mode_and_the_eager_model() -> None:
    mlp = low_rank_mlp()
    mlp[0].weight.requires_grad_(False)
    mlp.train()
    new, report = er.rewrite(mlp, RewriteConfig(structure="low_rank", budget=FlopBudget(ratio=0.5)), torch.randn(2, 64))
    assert isinstance(new, nn.Sequential) and isinstance(new[0], EinsumLinear)
    assert not any(p.requires_grad for p in new[0].parameters())
    assert all(p.requires_grad for p in new[2].parameters())
    assert new.training and new[0].training  # verify ran in eval mode and restored the flags
    assert [d.path for d in report.replaced] == ["module", "module"]


def test_conv1d_weight_is_transposed() -> None:
    model = tiny_gpt2()
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in=64, out=256)
    cfg = RewriteConfig(structure=LowRank(rank=64), budget=FlopBudget(ratio=2.0), target_modules=["h.0.mlp.c_fc"])
    new, report = er.rewrite(model, cfg)
    swapped = new.transformer.h[0].mlp.c_fc
    assert (swapped.in_features, swapped.out_features) == (64, 256)
    torch.testing.assert_close(swapped.to_dense(), layer.weight.t(), atol=1e-5, rtol=1e-5)
    assert report["transformer.h.0.mlp.c_fc"].weight_layout == "in_out"


def test_passes_compose_without_verify() -> None:
    model, inputs = tiny_gpt()
    ctx = PassContext(config=RewriteConfig(structure="monarch", budget=FlopBudget(ratio=0.5)))
    for step in (find_targets, size_targets, swap_modules):
        model, _ = step(model, ctx)
    assert sum(d.replaced for d in ctx.decisions.values()) == 8
    assert model(*inputs).shape == (2, 16, 128)
