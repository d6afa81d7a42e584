"""RewriteConfig, FlopBudget and LayerOverride: validation and the JSON round trip."""

from __future__ import annotations

import json

import pytest

from einrewrite import ConfigError, EinrewriteError, FlopBudget, LayerOverride, RewriteConfig
from einrewrite.structures import BTT, Einsum, LowRank


def test_defaults_are_btt_at_a_quarter_of_each_layer() -> None:
    cfg = RewriteConfig()
    assert cfg.structure == "btt" and cfg.budget == FlopBudget(ratio=0.25)
    assert cfg.target_modules == "all-linear" and cfg.init == "project"


@pytest.mark.parametrize(
    "cfg",
    [
        RewriteConfig(),
        RewriteConfig(
            structure="low_rank",
            budget=FlopBudget(macs_per_token=123_456),
            target_modules=["q_proj", "re:.*mlp\\..*"],
            exclude_modules="re:.*lm_head",
            overrides={
                "re:.*down_proj": BTT(rank=2, in_split=0.25, out_split=0.75),
                "layers.0.q_proj": None,
                "k_proj": FlopBudget(ratio=0.5),
                "v_proj": LayerOverride(structure="monarch", budget=FlopBudget(ratio=0.3)),
                "o_proj": Einsum(theta="(.5|0|.5|0|.5|.5|0)"),
            },
            init="mup",
            min_features=8,
        ),
        RewriteConfig(structure=LowRank(rank=4), exclude_modules=["lm_head"]),
    ],
)
def test_json_round_trip(cfg: RewriteConfig) -> None:
    payload = json.loads(json.dumps(cfg.to_dict()))
    assert payload["type"] == "RewriteConfig" and payload["version"] == 1
    assert RewriteConfig.from_dict(payload) == cfg


def test_budget_round_trip_and_limit() -> None:
    budget = FlopBudget(ratio=0.25)
    assert FlopBudget.from_dict(json.loads(json.dumps(budget.to_dict()))) == budget
    assert budget.limit(768 * 768) == 147_456
    assert not budget.is_global and FlopBudget(macs_per_token=10).is_global


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of ratio"),
        ({"ratio": 0.5, "macs_per_token": 10}, "exactly one of ratio"),
        ({"ratio": 0}, "ratio must be a number > 0"),
        ({"ratio": float("nan")}, "ratio must be a number > 0"),
        ({"macs_per_token": 0}, "macs_per_token must be an integer >= 1"),
        ({"macs_per_token": 2.5}, "macs_per_token must be an integer >= 1"),
    ],
)
def test_budget_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FlopBudget(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"structure": "nope"}, r"RewriteConfig.structure: unknown structure 'nope'; registered: .*btt"),
        ({"structure": 3}, r"expected a structure name"),
        ({"budget": 0.25}, r"budget must be a FlopBudget"),
        ({"target_modules": []}, r"target_modules: give 'all-linear'"),
        ({"target_modules": "re:("}, r"not a valid regular expression"),
        ({"exclude_modules": "all-linear"}, r"only meaningful for target_modules"),
        ({"exclude_modules": [""]}, r"every entry must be a non-empty string"),
        ({"init": "svd"}, r"init must be one of \('project', 'mup'\), got 'svd'"),
        ({"min_features": -1}, r"min_features must be an integer >= 0"),
        ({"overrides": [("x",)]}, r"expected \(pattern, value\) pairs"),
        ({"overrides": {"x": "nope"}}, r"overrides\['x'\]: unknown structure 'nope'"),
        ({"overrides": {"x": FlopBudget(macs_per_token=5)}}, r"must be per layer"),
        ({"filter_fn": "yes"}, r"filter_fn must be callable"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        RewriteConfig(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, (EinrewriteError, ValueError))


def test_lists_become_tuples_so_configs_stay_hashable() -> None:
    cfg = RewriteConfig(target_modules=["a", "b"], exclude_modules=["c"])
    assert cfg.target_modules == ("a", "b") and cfg.exclude_modules == ("c",)
    assert hash(cfg.budget) == hash(FlopBudget(ratio=0.25))


def test_from_dict_rejects_unknown_fields_and_versions() -> None:
    payload = RewriteConfig().to_dict()
    with pytest.raises(ConfigError, match=r"unknown fields \['budgte'\]"):
        RewriteConfig.from_dict({**payload, "data": {**payload["data"], "budgte": {"ratio": 0.5}}})
    with pytest.raises(ConfigError, match="unsupported version 9"):
        RewriteConfig.from_dict({**payload, "version": 9})
    with pytest.raises(ConfigError, match="expected type 'RewriteConfig'"):
        RewriteConfig.from_dict({"type": "LoraConfig", "version": 1, "data": {}})


def test_filter_fn_is_recorded_but_not_restored(caplog: pytest.LogCaptureFixture) -> None:
    def keep_attention(fqn: str, module: object) -> bool:
        return "attn" in fqn

    cfg = RewriteConfig(filter_fn=keep_attention)
    data = cfg.to_dict()
    assert data["data"]["filter_fn"].endswith("keep_attention")
    restored = RewriteConfig.from_dict(json.loads(json.dumps(data)))
    assert restored.filter_fn is None
    assert "cannot be restored" in caplog.text
