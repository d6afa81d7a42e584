"""Structure-aware learning rates (paper-notes §4.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from einrewrite import EinsumLinear, param_groups, structure


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Embedding(10, 64), EinsumLinear(structure("monarch", 64, 64)), nn.LayerNorm(64), nn.Linear(64, 32)
    )


def _lr_of(groups: list[dict], name: str) -> float:
    return next(g["lr"] for g in groups if name in g["param_names"])


def test_cores_get_width_over_cores_times_fan_in() -> None:
    groups = param_groups(_model(), lr=1e-3)
    # monarch 64 -> 64: A fan-in α = 8, B fan-in γρ = 8, two cores: lr · 64 / (2 · 8)
    assert _lr_of(groups, "1.A") == pytest.approx(1e-3 * 64 / 16)
    assert _lr_of(groups, "1.B") == pytest.approx(1e-3 * 64 / 16)
    assert _lr_of(groups, "3.weight") == pytest.approx(1e-3)
    assert _lr_of(groups, "2.weight") == pytest.approx(1e-3)  # LayerNorm
    assert _lr_of(groups, "0.weight") == pytest.approx(1e-3)  # embedding


def test_base_width_transfers_like_mup() -> None:
    groups = param_groups(_model(), lr=3e-3, base_width=768)
    assert _lr_of(groups, "1.A") == pytest.approx(3e-3 * 768 / (2 * 8))
    assert _lr_of(groups, "3.weight") == pytest.approx(3e-3 * 768 / 64)


def test_every_parameter_once_and_vectors_without_decay() -> None:
    model = _model()
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(g["weight_decay"] == 0.0 for g in groups if any(n.endswith("bias") for n in g["param_names"]))


def test_groups_drive_adamw() -> None:
    model = _model()
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2))
    x = torch.randint(0, 10, (4, 5))
    before = model[1].A.detach().clone()
    model(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, model[1].A)
