"""Targeting: PEFT matching semantics, and the reasons for leaving layers alone."""

from __future__ import annotations

import pytest
from torch import nn

from einrewrite import RewriteConfig
from einrewrite.passes import PassContext, find_targets
from einrewrite.targets import find_candidates, matches, matches_any

from models import tiny_mixtral, tiny_vit  # type: ignore[import-not-found]


@pytest.mark.parametrize(
    ("name", "pattern", "hit"),
    [
        ("model.layers.0.self_attn.q_proj", "q_proj", True),  # .suffix
        ("model.layers.0.self_attn.q_proj", "self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "proj", False),  # not a whole component
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj", True),
        ("model.layers.0.self_attn.q_proj", "re:.*layers\\.0\\..*", True),
        ("model.layers.10.self_attn.q_proj", "re:.*layers\\.1\\..*", False),  # full match
    ],
)
def test_list_entries(name: str, pattern: str, hit: bool) -> None:
    assert matches(name, pattern) is hit


def test_a_string_rule_is_a_full_match_regex_as_in_peft() -> None:
    assert matches_any(["a.q_proj"], ".*q_proj") == ".*q_proj"
    assert matches_any(["a.q_proj"], "q_proj") is None
    assert matches_any(["a.q_proj", "b"], ("x", "b")) == "b"


def _reasons(model: nn.Module, **kwargs: object) -> dict[str, str]:
    ctx = PassContext(config=RewriteConfig(**kwargs))  # type: ignore[arg-type]
    find_targets(model, ctx)
    return {fqn: code for fqn, (code, _) in ctx.rule_skips.items()}


def test_mixtral_router_and_fused_experts_are_candidates_with_reasons() -> None:
    model = tiny_mixtral()
    kinds = {c.fqn: c.kind for c in find_candidates(model)}
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == "experts"
    assert kinds["model.layers.0.mlp.gate.weight"] == "param"
    reasons = _reasons(model)
    assert reasons["model.layers.0.mlp.gate.weight"] == "router"
    assert reasons["model.layers.1.mlp.experts.down_proj"] == "fused_experts"
    assert reasons["lm_head"] == "output_head"


def test_all_linear_leaves_classifier_heads_but_names_include_them() -> None:
    model = tiny_vit()
    assert _reasons(model)["classifier"] == "output_head"
    named = _reasons(model, target_modules=["classifier"], min_features=8)
    assert "classifier" not in named  # targeted by name
    assert set(named.values()) == {"not_targeted"} and len(named) == 12


def test_multihead_attention_out_proj_is_read_directly() -> None:
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(64, 4)
    assert _reasons(model)["attn.out_proj"] == "read_directly"


def test_unmatched_exclude_entries_are_noted() -> None:
    ctx = PassContext(config=RewriteConfig(exclude_modules=["nope"]))
    find_targets(nn.Sequential(nn.Linear(64, 64)), ctx)
    assert ctx.notes == ["exclude_modules entry 'nope' matched no layer"]


def test_filter_fn_gets_fqn_and_module() -> None:
    seen = []

    def keep(fqn: str, module: nn.Module) -> bool:
        seen.append((fqn, type(module).__name__))
        return fqn == "1"

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    assert _reasons(model, filter_fn=keep) == {"0": "filtered"}
    assert seen == [("0", "Linear"), ("1", "Linear")]
