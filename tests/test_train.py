"""The training loop: loss goes down, compute accounting, grad accumulation, compile, checkpoints, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import einrewrite as er
from einrewrite.data import load_corpus
from einrewrite.gpt import GPT, GPTConfig, build_gpt
from einrewrite.train import (
    FLOPS_PER_MAC_TRAIN,
    TrainConfig,
    TrainConfigError,
    TrainingDivergedError,
    active_macs_per_token,
    train,
)

SMALL = GPTConfig(d_model=32, d_head=16, n_layer=1, block_size=16)
BTT = er.RewriteConfig(structure="btt", budget=er.FlopBudget(ratio=0.5), init="mup", min_features=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


@pytest.fixture(scope="module")
def corpus():  # type: ignore[no-untyped-def]
    return load_corpus(max_bytes=200_000)


def test_loss_decreases_and_compute_is_six_macs_per_token(corpus) -> None:  # type: ignore[no-untyped-def]
    model, _ = build_gpt(SMALL, BTT)
    cfg = TrainConfig(steps=30, batch_size=8, block_size=16, lr=1e-2, warmup=5, eval_every=15, eval_batches=2)
    result = train(model, corpus, cfg)
    assert [p.step for p in result.history] == [0, 15, 30]
    first, last = result.history[0], result.history[-1]
    assert first.val_loss == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=1e-4)  # zero head
    assert last.val_loss < first.val_loss - 1.0
    assert last.train_loss is not None and last.lr == pytest.approx(1e-2)
    macs = result.macs
    linear = sum(m.macs for m in model.modules() if isinstance(m, er.EinsumLinear))
    assert macs.structured == linear and macs.dense_linear == 0
    assert macs.head == 32 * 256 and macs.attention == 2 * 16 * 32
    assert last.compute == FLOPS_PER_MAC_TRAIN * macs.total * 30 * 8 * 16
    assert result.params == sum(p.numel() for p in model.parameters())


def test_param_groups_give_structured_cores_their_own_rates(corpus) -> None:  # type: ignore[no-untyped-def]
    model, _ = build_gpt(SMALL, BTT)
    groups = er.param_groups(model, 1e-2)
    rates = {round(g["lr"], 9) for g in groups}
    assert len(rates) > 1 and 1e-2 in rates


def test_grad_accumulation_follows_the_full_batch(corpus) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(steps=3, batch_size=8, block_size=16, warmup=1, eval_every=3, eval_batches=1)
    one, _ = build_gpt(SMALL, BTT)
    two, _ = build_gpt(SMALL, BTT)
    train(one, corpus, cfg)
    train(two, corpus, TrainConfig(**{**cfg.to_dict(), "grad_accum": 4, "betas": cfg.betas}))
    for (name, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_training_matches_eager(corpus) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(steps=2, batch_size=4, block_size=16, warmup=1, eval_every=2, eval_batches=1)
    eager, _ = build_gpt(SMALL, BTT)
    compiled, _ = build_gpt(SMALL, BTT)
    a = train(eager, corpus, cfg)
    b = train(compiled, corpus, TrainConfig(**{**cfg.to_dict(), "compile": "aot_eager", "betas": cfg.betas}))
    assert b.final_val_loss == pytest.approx(a.final_val_loss, rel=1e-4)


def test_checkpoints_are_save_pretrained_directories(corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = build_gpt(SMALL, BTT)
    cfg = TrainConfig(steps=4, batch_size=4, block_size=16, warmup=1, eval_every=2, eval_batches=1,
                      checkpoint_every=2)
    result = train(model, corpus, cfg, out_dir=tmp_path)
    assert [Path(c).name for c in result.checkpoints] == ["step_000002", "step_000004"]
    assert (tmp_path / "history.csv").read_text().count("\n") == 1 + 3
    assert json.loads((tmp_path / "train_result.json").read_text())["macs_per_token"]["total"] == result.macs.total
    loaded = er.load_pretrained(result.checkpoints[-1], base_model=GPT(SMALL))
    x = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(loaded(x), model(x))


def test_dense_model_checkpoint_and_macs(corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = GPT(SMALL)
    assert active_macs_per_token(model, 16).dense_linear == 12 * 32 * 32
    result = train(model, corpus, TrainConfig(steps=1, batch_size=2, block_size=16, eval_batches=1), out_dir=tmp_path)
    assert (Path(result.checkpoints[0]) / "model.safetensors").exists()


def test_config_errors(corpus) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrainConfigError, match=r"TrainConfig.steps must be an integer >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(
        TrainConfigError, match="does not split into 1 processes x 3 micro-batches; use a multiple of 3"
    ):
        train(GPT(SMALL), corpus, TrainConfig(steps=1, batch_size=4, block_size=16, grad_accum=3))
    with pytest.raises(TrainConfigError, match="exceeds the model's block_size = 16"):
        train(GPT(SMALL), corpus, TrainConfig(steps=1, batch_size=4, block_size=32))
    with pytest.raises(TrainingDivergedError, match="lower TrainConfig.lr"):
        train(GPT(SMALL), corpus, TrainConfig(steps=3, batch_size=4, block_size=16, lr=1e30, warmup=0,
                                              grad_clip=0, eval_batches=1))


def test_moe_aux_loss_is_added_with_its_weight(corpus) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("einrewrite.moe")
    moe = er.RewriteConfig(structure="btt", budget=er.FlopBudget(ratio=0.5), init="mup", min_features=1,
                           overrides={"re:.*mlp\\..*": er.LayerOverride(structure="btt_moe",
                                                                         budget=er.FlopBudget(ratio=1.0))})
    states = []
    for weight in (0.01, 0.0):
        model, _ = build_gpt(SMALL, moe)
        result = train(model, corpus, TrainConfig(steps=2, batch_size=4, block_size=16, warmup=1, eval_every=2,
                                                  eval_batches=1, aux_loss_weight=weight))
        states.append(model.state_dict())
    router = "blocks.0.mlp.fc_in.router.weight"
    assert router in states[0]
    assert not torch.equal(states[0][router], states[1][router])  # the load-balancing loss moves the router
    assert result.macs.structured == sum(m.macs for m in model.modules() if hasattr(m, "router") or
                                         isinstance(m, er.EinsumLinear))
