"""Budget solvers: never over budget, as close as possible, monotone, ties broken as documented."""

from __future__ import annotations

import random

import pytest

from einrewrite import BudgetInfeasibleError, FlopBudget, StructureMismatchError
from einrewrite.budget import LayerRequest, candidate_specs, solve, solve_layer
from einrewrite.structures import BTT, LowRank

SIZES = [(64, 64), (64, 256), (768, 3072), (768, 101), (97, 64)]


@pytest.mark.parametrize("structure", ["btt", "low_rank", "monarch", "tensor_train"])
@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
def test_per_layer_choice_is_the_largest_within_budget_and_monotone(structure: str, d_in: int, d_out: int) -> None:
    specs = candidate_specs(structure, d_in, d_out)
    dense = d_in * d_out
    assert all(s.macs < dense for s in specs)
    assert [s.macs for s in specs] == sorted({s.macs for s in specs})
    previous = 0
    for ratio in (0.05, 0.1, 0.2, 0.25, 0.4, 0.6, 0.9):
        limit = int(ratio * dense)
        fitting = [s for s in specs if s.macs <= limit]
        req = LayerRequest("fc", d_in, d_out, structure)
        if not fitting:
            with pytest.raises(BudgetInfeasibleError):
                solve_layer(req, ratio)
            continue
        spec = solve_layer(req, ratio).spec
        assert spec.macs <= limit  # never over budget
        assert spec.macs == max(s.macs for s in fitting)  # as close as possible
        assert spec.macs >= previous  # monotone in the budget
        previous = spec.macs


def test_btt_at_a_quarter_of_768_is_rank_3_and_exact() -> None:
    spec = solve_layer(LayerRequest("h.0.mlp", 768, 768, "btt"), 0.25).spec
    assert spec.macs == 147_456 == 768 * 768 // 4
    assert spec.hyper_dict == {"rank": 3, "in_split": 0.5, "out_split": 0.5}


def test_ties_prefer_full_rank_then_less_padding() -> None:
    for d_in, d_out in SIZES:
        chosen = {s.macs: s for s in candidate_specs("btt", d_in, d_out)}
        for hyper in BTT.search_space(d_in, d_out):
            try:
                other = hyper.bind(d_in, d_out)
            except ValueError:
                continue
            best = chosen.get(other.macs)
            if best is None:
                continue
            key = (abs(best.psi - 1) > 1e-9, best.padding_overhead)
            assert key <= (abs(other.psi - 1) > 1e-9, other.padding_overhead)


def test_infeasible_message_names_layer_need_and_allowance() -> None:
    with pytest.raises(BudgetInfeasibleError, match=r"^model.layers.0.k_proj: btt needs >= 640 MACs/token for a "
                       r"64->32 layer .* the budget allows 512 \(0.25x of dense 2,048\); raise the budget to at least "
                       r"0.3125 or exclude 'model.layers.0.k_proj'"):
        solve_layer(LayerRequest("model.layers.0.k_proj", 64, 32, "btt"), 0.25)


def test_fixed_structure_is_only_checked() -> None:
    req = LayerRequest("fc", 64, 64, LowRank(rank=64))
    assert solve_layer(req, 2.0).spec.hyper_dict == {"rank": 64}  # a ratio above 1 admits exact full rank
    with pytest.raises(
        BudgetInfeasibleError, match=r"^fc: low_rank\(rank=64\).* needs 8,192 MACs/token .* allows 4,096"
    ):
        solve_layer(req, 1.0)
    with pytest.raises(StructureMismatchError, match=r"^fc: low_rank .* does not fit this 64->8 layer"):
        solve_layer(LayerRequest("fc", 64, 8, LowRank(rank=9)), 1.0)


def test_dense_cheaper_and_no_fit_are_skips() -> None:
    choice = solve_layer(LayerRequest("tiny", 4, 4, "kronecker"), 0.9)
    assert choice.spec is None and choice.skip is not None and choice.skip[0] == "dense_cheaper"
    assert "dense is cheaper" in choice.skip[1]
    choice = solve_layer(LayerRequest("x", 64, 64, "einsum"), 0.5)
    assert choice.spec is None and choice.skip is not None and choice.skip[0] == "no_fit"
    assert "fixed structure" in choice.skip[1]


def test_global_budget_is_never_exceeded_and_nearly_spent() -> None:
    rng = random.Random(0)
    for _ in range(12):
        reqs = [
            LayerRequest(f"l{i}", rng.choice([64, 96, 128, 256]), rng.choice([64, 96, 128, 256]), "low_rank")
            for i in range(rng.randint(1, 6))
        ]
        least = sum(candidate_specs("low_rank", r.d_in, r.d_out)[0].macs for r in reqs)
        dense = sum(r.dense_macs for r in reqs)
        total = rng.randint(least, dense)
        choices = solve(reqs, FlopBudget(macs_per_token=total))
        spent = sum(c.spec.macs for c in choices)
        assert spent <= total
        # greedy top-up: no single layer could move up one candidate within the budget
        for c, r in zip(choices, reqs, strict=True):
            specs = candidate_specs("low_rank", r.d_in, r.d_out)
            i = [s.macs for s in specs].index(c.spec.macs)
            if i + 1 < len(specs):
                assert spent + specs[i + 1].macs - c.spec.macs > total


def test_global_budget_counts_fixed_layers_and_fails_clearly() -> None:
    reqs = [LayerRequest("a", 64, 64, "low_rank"), LayerRequest("b", 64, 64, LowRank(rank=8))]
    choices = solve(reqs, FlopBudget(macs_per_token=2048))
    assert choices[1].spec.macs == 1024 and choices[0].spec.macs == 1024
    with pytest.raises(BudgetInfeasibleError, match=r"^a: the budget of 1,100 MACs/token is below the least the "
                       r"rewritten layers can cost, 1,152 MACs/token .*raise macs_per_token to at least 1,152"):
        solve(reqs, FlopBudget(macs_per_token=1100))


def test_per_layer_override_ratio_applies_under_a_global_budget() -> None:
    reqs = [LayerRequest("a", 64, 64, "low_rank", ratio=0.25), LayerRequest("b", 64, 64, "low_rank")]
    choices = solve(reqs, FlopBudget(macs_per_token=3000))
    assert choices[0].spec.macs == 1024 and choices[0].limit == 1024
    assert choices[1].spec.macs <= 3000 - 1024
