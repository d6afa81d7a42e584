"""The small GPT: shapes, causality, config errors and the rewritten µP build."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import einrewrite as er
from einrewrite.gpt import GPT, GPTConfig, ModelConfigError, build_gpt, zero_init_residual_outputs

SMALL = GPTConfig(d_model=32, d_head=16, n_layer=2, block_size=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def test_forward_shape_and_causality() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=32, d_head=16, n_layer=2, block_size=16, zero_init=False)).eval()
    idx = torch.randint(0, 256, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, 256)
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    out = model(changed)
    torch.testing.assert_close(out[:, :8], logits[:, :8])  # the past does not see the future
    assert not torch.allclose(out[:, 8:], logits[:, 8:])


def test_zero_init_gives_uniform_predictions() -> None:
    model = GPT(SMALL)
    logits = model(torch.randint(0, 256, (1, 8)))
    assert torch.count_nonzero(logits) == 0  # zero head: log(256) nats at step 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"d_model": 48, "d_head": 32}, "not a multiple of d_head = 32; choose a width such as 32"),
     ({"n_layer": 0}, r"GPTConfig.n_layer must be an integer >= 1, got 0")],
)
def test_config_errors(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ModelConfigError, match=match):
        GPTConfig(**kwargs)


def test_too_long_input_names_block_size() -> None:
    with pytest.raises(ModelConfigError, match="longer than block_size = 16"):
        GPT(SMALL)(torch.zeros(1, 17, dtype=torch.long))


def test_build_gpt_rewrites_every_projection_and_keeps_head_dense() -> None:
    cfg = er.RewriteConfig(structure="btt", budget=er.FlopBudget(ratio=0.5), init="mup", min_features=1)
    model, report = build_gpt(SMALL, cfg, seed=1)
    replaced = {d.fqn for d in report.replaced}
    assert replaced == {f"blocks.{i}.{p}" for i in range(2) for p in
                        ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc_in", "mlp.fc_out")}
    assert isinstance(model.lm_head, nn.Linear) and torch.count_nonzero(model.lm_head.weight) == 0
    for block in model.blocks:  # µP: the last core of each residual output is zero, the first is not
        for layer in (block.attn.o_proj, block.mlp.fc_out):
            cores = list(layer.cores().values())
            assert torch.count_nonzero(cores[-1]) == 0 and torch.count_nonzero(cores[0]) > 0
    again, _ = build_gpt(SMALL, cfg, seed=1)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)  # the seed fixes the whole initialisation


def test_zero_init_residual_outputs_on_dense_model() -> None:
    model = GPT(GPTConfig(d_model=32, d_head=16, n_layer=1, block_size=8, zero_init=False))
    assert zero_init_residual_outputs(model) == ["blocks.0.attn.o_proj", "blocks.0.mlp.fc_out"]
    assert torch.count_nonzero(model.blocks[0].mlp.fc_out.weight) == 0
