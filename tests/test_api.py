"""einrewrite.rewrite / save_pretrained / load_pretrained on tiny models nobody here wrote."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import einrewrite as er
from einrewrite import (
    BudgetInfeasibleError,
    ConfigError,
    EinsumLinear,
    FlopBudget,
    LayerOverride,
    NoTargetsError,
    RewriteConfig,
    SavedModelError,
)
from einrewrite.passes.verify import output_tensors
from einrewrite.structures import BTT, LowRank

from models import (  # type: ignore[import-not-found]
    OddSizes,
    low_rank_mlp,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mixtral,
    tiny_vit,
    token_ids,
)

# model factory, budget ratio, {fqn suffix: expected skip reason}, number of replaced layers
HF_CASES: dict[str, tuple[Callable[[], nn.Module], float, dict[str, str], int]] = {
    "gpt2": (tiny_gpt2, 0.25, {"lm_head": "tied_weight"}, 8),
    "bert": (tiny_bert, 0.25, {}, 13),
    "llama": (tiny_llama, 0.5, {"lm_head": "output_head"}, 14),
    "vit": (tiny_vit, 0.25, {"classifier": "output_head"}, 12),
    "mixtral": (
        tiny_mixtral,
        0.5,
        {"mlp.gate.weight": "router", "experts.gate_up_proj": "fused_experts", "experts.down_proj": "fused_experts",
         "lm_head": "output_head"},
        8,
    ),
}


def _outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return output_tensors(model(**inputs))


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_hf_models_rewrite_with_reported_decisions(name: str) -> None:
    build, ratio, skips, n_replaced = HF_CASES[name]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, report = er.rewrite(model, RewriteConfig(structure="btt", budget=FlopBudget(ratio=ratio)))

    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, EinsumLinear) for m in model.modules())

    assert report.path == "module" and report.verified is True
    assert len(report.replaced) == n_replaced
    for d in report.skipped:
        expected = [reason for suffix, reason in skips.items() if d.fqn.endswith(suffix)]
        assert expected == [d.reason], (d.fqn, d.reason, d.detail)
        assert d.detail
    for d in report.replaced:  # per-layer budget respected, and the layer really is structured
        assert d.macs_after <= d.budget_macs <= ratio * d.macs_before
        layer = new.get_submodule(d.fqn)
        assert isinstance(layer, EinsumLinear) and layer.spec.macs == d.macs_after
        assert 0 <= d.projection_error < 1
    inputs = token_ids() if name != "vit" else {"pixel_values": torch.randn(2, 3, 32, 32)}
    ref, out = _outputs(model, inputs), _outputs(new, inputs)
    assert [(t.shape, t.dtype) for t in ref] == [(t.shape, t.dtype) for t in out]


def test_gpt2_conv1d_layout_is_exact_at_full_rank_and_generation_works() -> None:
    model = tiny_gpt2()
    # full-rank low-rank represents any weight: outputs must match dense, which needs Conv1D's (in, out) layout right
    cfg = RewriteConfig(structure=LowRank(rank=64), budget=FlopBudget(ratio=2.0))
    new, report = er.rewrite(model, cfg)
    conv = [d for d in report.replaced if d.kind == "Conv1D"]
    assert len(conv) == 8 and {d.weight_layout for d in conv} == {"in_out"}
    assert all(d.projection_error < 1e-5 for d in report.replaced)
    ids = token_ids()
    torch.testing.assert_close(_outputs(new, ids)[0], _outputs(model, ids)[0], atol=2e-4, rtol=1e-4)
    generated = new.generate(ids["input_ids"][:1, :3], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_exact_outputs_where_the_structure_represents_the_weight() -> None:
    mlp = low_rank_mlp(rank=2)
    x = torch.randn(4, 64)
    new, report = er.rewrite(mlp, RewriteConfig(structure="low_rank", budget=FlopBudget(ratio=0.5)), x)
    assert all(d.hyper["rank"] >= 2 and d.projection_error < 1e-5 for d in report.replaced)
    torch.testing.assert_close(new(x), mlp(x), atol=1e-5, rtol=1e-5)
    assert report.output_error is not None and report.output_error < 1e-5


def test_odd_sizes_768_and_a_prime() -> None:
    model = OddSizes()
    x = torch.randn(3, 768)
    new, report = er.rewrite(model, RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.25)), x)
    assert [d.fqn for d in report.replaced] == ["down", "up", "mix"]
    assert {(d.d_in, d.d_out) for d in report.replaced} == {(768, 101), (101, 768), (768, 768)}
    assert all(d.macs_after <= 0.25 * d.macs_before for d in report.replaced)
    assert report["mix"].macs_after == 768 * 768 // 4  # 768 = 24 x 32 factors exactly
    assert new(x).shape == (3, 768) and new(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_preserved(dtype: torch.dtype) -> None:
    model = low_rank_mlp().to(dtype)
    x = torch.randn(2, 64, dtype=dtype)
    new, report = er.rewrite(model, RewriteConfig(), x)
    assert new(x).dtype == dtype and new[0].A.dtype == dtype and report.verified


def test_global_budget_is_allocated_and_respected() -> None:
    model = OddSizes()
    total = 200_000
    _, report = er.rewrite(model, RewriteConfig(budget=FlopBudget(macs_per_token=total)), torch.randn(2, 768))
    spent = sum(d.macs_after for d in report.replaced)
    assert 0.9 * total <= spent <= total
    with pytest.raises(BudgetInfeasibleError, match=r"budget of 1,000 MACs/token is below the least"):
        er.rewrite(model, RewriteConfig(budget=FlopBudget(macs_per_token=1000)), torch.randn(2, 768))


def test_targeting_excludes_filter_and_ordered_overrides() -> None:
    model = tiny_llama()
    cfg = RewriteConfig(
        structure="btt",
        budget=FlopBudget(ratio=0.5),
        target_modules=["q_proj", "re:.*mlp\\.(up|down)_proj", "o_proj"],
        exclude_modules=["layers.1.self_attn.q_proj"],
        filter_fn=lambda fqn, module: "layers.1.mlp.down" not in fqn,
        overrides={
            "re:.*layers\\.0\\.mlp\\..*": LowRank(rank=4),
            "re:.*mlp\\..*": "monarch",  # not reached for layer 0: the first match wins
            "o_proj": None,
        },
    )
    _, report = er.rewrite(model, cfg)
    reasons = {d.fqn: d.reason for d in report.skipped}
    assert reasons["model.layers.1.self_attn.q_proj"] == "excluded"
    assert reasons["model.layers.1.mlp.down_proj"] == "filtered"
    assert reasons["model.layers.0.self_attn.o_proj"] == "override_dense"
    assert reasons["model.layers.0.self_attn.k_proj"] == "not_targeted"
    structures = {d.fqn: (d.structure, d.hyper) for d in report.replaced}
    assert structures["model.layers.0.mlp.up_proj"] == ("low_rank", {"rank": 4})
    assert structures["model.layers.1.mlp.up_proj"][0] == "monarch"
    assert structures["model.layers.0.self_attn.q_proj"][0] == "btt"


def test_override_budget_and_min_features() -> None:
    model = OddSizes()
    cfg = RewriteConfig(overrides={"mix": FlopBudget(ratio=0.1)}, min_features=128)
    _, report = er.rewrite(model, cfg, torch.randn(2, 768))
    assert report["mix"].macs_after <= 0.1 * 768 * 768
    assert report["down"].reason == report["up"].reason == "below_min_features"
    assert "min_features=128" in report["down"].detail


def test_inplace_modifies_the_model_and_rewriting_again_is_a_noop() -> None:
    model = tiny_gpt2()
    same, report = er.rewrite(model, inplace=True)
    assert same is model and isinstance(model.transformer.h[0].attn.c_attn, EinsumLinear)
    again, report2 = er.rewrite(model)
    assert report2.noop and not report2.replaced
    assert {d.reason for d in report2.skipped} == {"already_structured", "tied_weight"}
    assert "already rewritten" in report2.summary()


def test_mup_init_starts_fresh() -> None:
    mlp = low_rank_mlp()
    x = torch.randn(2, 64)
    new, report = er.rewrite(mlp, RewriteConfig(structure="low_rank", budget=FlopBudget(ratio=0.5), init="mup"), x)
    assert all(d.projection_error is None for d in report.replaced)
    assert not torch.allclose(new(x), mlp(x))


# ---- errors -------------------------------------------------------------------------------------------------
def test_nothing_matched_lists_the_model_and_how_to_target() -> None:
    with pytest.raises(NoTargetsError, match=r"^model \(GPT2LMHeadModel\): no layer was rewritten\. It has 9 "
                       r"linear-like candidates \(Conv1D x8, Linear x1\).*target_modules=\('q_proj',\) matched none.*"
                       r"'c_attn'.*einrewrite inspect"):
        er.rewrite(tiny_gpt2(), RewriteConfig(target_modules=["q_proj"]))


def test_all_excluded_is_no_targets() -> None:
    with pytest.raises(NoTargetsError, match=r"exclude_modules=\('re:\.\*',\) excluded the rest"):
        er.rewrite(OddSizes(), RewriteConfig(exclude_modules=["re:.*"]), torch.randn(1, 768))


def test_budget_infeasible_names_the_layer() -> None:
    with pytest.raises(BudgetInfeasibleError, match=r"^model\.layers\.0\.self_attn\.k_proj: btt needs >= 640 "
                       r"MACs/token for a 64->32 layer"):
        er.rewrite(tiny_llama(), RewriteConfig(budget=FlopBudget(ratio=0.25)))


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model: expected a torch.nn.Module, got dict"):
        er.rewrite({}, RewriteConfig())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mode must be one of"):
        er.rewrite(OddSizes(), mode="fx")
    with pytest.raises(ConfigError, match=r"example_inputs: the original model \(OddSizes\) fails on them"):
        er.rewrite(OddSizes(), RewriteConfig(), torch.randn(2, 5))
    with pytest.raises(ConfigError, match="config: expected an einrewrite.RewriteConfig"):
        er.rewrite(OddSizes(), {"structure": "btt"})  # type: ignore[arg-type]


# ---- save / load --------------------------------------------------------------------------------------------
def test_save_and_load_hf_model_without_base(tmp_path: Path) -> None:
    new, report = er.rewrite(tiny_gpt2())
    out = er.save_pretrained(new, tmp_path / "gpt2", report)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "einrewrite.json", "model.safetensors"]
    meta = json.loads((out / "einrewrite.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__ and meta["config"]["type"] == "RewriteConfig"
    assert meta["base"]["class"].endswith(":GPT2LMHeadModel")
    reloaded = er.load_pretrained(out)
    ids = token_ids()
    assert torch.equal(_outputs(new, ids)[0], _outputs(reloaded, ids)[0])
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # still tied
    assert [d.fqn for d in reloaded.einrewrite_report.replaced] == [d.fqn for d in report.replaced]


def test_save_and_load_with_base_model(tmp_path: Path) -> None:
    model = OddSizes()
    x = torch.randn(2, 768)
    new, _ = er.rewrite(model, RewriteConfig(), x)
    er.save_pretrained(new, tmp_path / "odd")
    base = OddSizes()
    reloaded = er.load_pretrained(tmp_path / "odd", base_model=base)
    assert torch.equal(new(x), reloaded(x))
    assert isinstance(base.mix, nn.Linear)  # the base model was copied, not modified


def test_save_refuses_to_overwrite_and_load_rejects_bad_directories(tmp_path: Path) -> None:
    model = OddSizes()
    new, report = er.rewrite(model, RewriteConfig(), torch.randn(1, 768))
    out = er.save_pretrained(new, tmp_path / "odd", report)
    with pytest.raises(SavedModelError, match=r"odd: directory exists and is not empty; pass overwrite=True"):
        er.save_pretrained(new, out, report)
    er.save_pretrained(new, out, report, overwrite=True)

    with pytest.raises(SavedModelError, match="cannot rebuild the base model .*pass base_model="):
        er.load_pretrained(out)
    with pytest.raises(
        SavedModelError, match=r"down: saved as a Linear 768->101 but the base model has Linear 768->64"
    ):
        bad = OddSizes()
        bad.down = nn.Linear(768, 64)
        er.load_pretrained(out, base_model=bad)
    with pytest.raises(SavedModelError, match="already has a structured layer here"):
        er.load_pretrained(out, base_model=new)
    with pytest.raises(SavedModelError, match="not a directory"):
        er.load_pretrained(tmp_path / "missing")
    (out / "model.safetensors").unlink()
    with pytest.raises(SavedModelError, match="weights file model.safetensors is missing; the directory is partial"):
        er.load_pretrained(out, base_model=OddSizes())
    (out / "einrewrite.json").write_text("{not json")
    with pytest.raises(SavedModelError, match="corrupt JSON"):
        er.load_pretrained(out, base_model=OddSizes())
    (out / "einrewrite.json").unlink()
    with pytest.raises(SavedModelError, match=r"no einrewrite.json \(found: nothing\)|no einrewrite.json"):
        er.load_pretrained(out, base_model=OddSizes())


def test_save_needs_a_report(tmp_path: Path) -> None:
    with pytest.raises(SavedModelError, match="needs the RewriteReport"):
        er.save_pretrained(OddSizes(), tmp_path / "x")


def test_override_structure_instance_round_trips_through_save(tmp_path: Path) -> None:
    model = OddSizes()
    x = torch.randn(2, 768)
    cfg = RewriteConfig(overrides=[("mix", LayerOverride(structure=BTT(rank=1, in_split=0.25, out_split=0.75)))])
    new, _ = er.rewrite(model, cfg, x)
    er.save_pretrained(new, tmp_path / "o")
    reloaded = er.load_pretrained(tmp_path / "o", base_model=OddSizes())
    assert reloaded.mix.spec == new.mix.spec
    assert torch.equal(new(x), reloaded(x))


def test_load_model_reads_a_hugging_face_directory_with_weights(tmp_path: Path) -> None:
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "hf")
    loaded = er.load_model(tmp_path / "hf")
    assert loaded.source == "hf" and type(loaded.model).__name__ == "GPT2LMHeadModel"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    with pytest.raises(er.ModelSourceError, match="a directory without config.json"):
        er.load_model(tmp_path)
