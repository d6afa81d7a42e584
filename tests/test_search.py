"""Structure search: canonical sampling, the taxonomy filter, iso-FLOP sizing, ranking and resuming."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from einrewrite import EinsumLinear
from einrewrite.search import (
    PAPER_THETAS,
    RegressionTask,
    SearchError,
    make_candidates,
    sample_thetas,
    search,
    taxonomy_filter,
)
from einrewrite.structures import Einsum
from einrewrite.theta import parse_theta, validate_theta


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


def test_samples_stay_in_the_canonical_region_and_sum_to_one() -> None:
    thetas = sample_thetas(300, seed=0)
    assert len(thetas) == 300 and len(set(thetas)) == 300
    for t in thetas:
        assert validate_theta(t) == t  # canonical: ρ <= min(α, ε) and min(α, ε) >= min(β, δ)
        assert all(0.0 <= v <= 1.0 for v in t)
        assert sum(t[:3]) == pytest.approx(1.0, abs=1e-9) and sum(t[3:6]) == pytest.approx(1.0, abs=1e-9)
        assert t.rho <= min(t.alpha, t.epsilon) and min(t.alpha, t.epsilon) >= min(t.beta, t.delta)
    assert sample_thetas(5, seed=3) == sample_thetas(5, seed=3) != sample_thetas(5, seed=4)
    # uniform: every axis takes both small and large values, no region left out
    for axis in range(6):
        values = [t[axis] for t in thetas]
        assert min(values) < 0.1 and max(values) > 0.6
    assert sum(t.omega > 0 for t in thetas) > 30 and sum(t.psi < 1 for t in thetas) > 30


@pytest.mark.parametrize("theta", sample_thetas(12, seed=7), ids=str)
def test_every_sampled_theta_builds_a_layer_equal_to_its_dense_weight(theta) -> None:  # type: ignore[no-untyped-def]
    layer = EinsumLinear(Einsum(theta=tuple(theta)).bind(48, 40))
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + (0 if layer.bias is None else layer.bias),
                               rtol=1e-4, atol=1e-5)


def test_candidates_cover_registry_paper_and_samples() -> None:
    cands = make_candidates(samples=3, seed=1)
    sources = [c.source for c in cands]
    assert sources.count("paper") == len(PAPER_THETAS) == 23 and sources.count("sampled") == 3
    names = {c.label for c in cands if c.source == "named"}
    assert {"dense", "low_rank", "btt", "kronecker", "monarch"} <= names and "einsum" not in names
    assert all(validate_theta(parse_theta(t)) for t in PAPER_THETAS)
    with pytest.raises(SearchError, match="unknown structure.*'nope'.*choose from"):
        make_candidates(named=["nope"])


def test_taxonomy_filter_is_a_safe_expression() -> None:
    keep = taxonomy_filter("omega == 0 and psi == 1")
    assert keep({"omega": 1e-12, "psi": 1.0}) and not keep({"omega": 0.5, "psi": 1.0})
    assert taxonomy_filter("not (nu < 0.5) or rho > 0")({"nu": 0.4, "rho": 0.25})
    assert taxonomy_filter("0 <= alpha - epsilon < .1")({"alpha": 0.5, "epsilon": 0.45})
    for bad, match in [("__import__('os').system('true')", "Call is not allowed"),
                       ("omega.real == 0", "Attribute is not allowed"),
                       ("size == 3", "unknown name 'size'"),
                       ("psi == 'x'", "only numbers"),
                       ("psi ==", "not a valid expression")]:
        with pytest.raises(SearchError, match=match):
            taxonomy_filter(bad)


@pytest.fixture(scope="module")
def regression_run() -> tuple[object, RegressionTask]:
    torch.set_num_threads(1)
    task = RegressionTask(d=16, steps=120)
    cands = [c for c in make_candidates(named=["dense", "low_rank"], paper=True)
             if c.source == "named" or c.label in ("θ=(.5|0|.5|0|.5|.5|.25)", "θ=(.5|.5|0|.5|.5|0|0)")]
    return search(task, cands, flops_ratio=1.0, progress=False), task


def test_search_ranks_a_structure_that_cannot_fit_below_one_that_can(  # type: ignore[no-untyped-def]
    regression_run,
) -> None:
    result, _ = regression_run
    ranked = [r.candidate for r in result.ranked()]
    rows = {r.candidate: r for r in result.rows}
    # the target is a full-rank (orthogonal) map: dense fits it, low rank (ψ < 1) cannot
    assert ranked.index("dense") < ranked.index("low_rank")
    assert rows["dense"].val_loss < 0.05 < 0.3 < rows["low_rank"].val_loss
    assert rows["low_rank"].psi < 1 and rows["dense"].psi == 1
    assert result.best.candidate == ranked[0]
    for r in result.rows:  # every candidate is sized to the same budget
        assert r.status == "ok" and r.macs <= result.budget_macs == 2 * 16 * 16
    kron = rows["θ=(.5|.5|0|.5|.5|0|0)"]
    assert kron.omega == pytest.approx(0.5) and kron.width > 16  # cheap per width: a fixed θ grows its width
    assert "rank" in result.table() and "val loss" in result.table()


def test_filter_resume_and_csv(tmp_path: Path) -> None:
    task = RegressionTask(d=8, steps=5, widths=(4, 8))
    path = tmp_path / "search.csv"
    seen: list[str] = []
    first = search(task, named=["dense", "low_rank"], paper=True, where="omega == 0 and psi == 1",
                   flops_ratio=1.0, csv_path=path, progress=False, on_row=lambda r: seen.append(r.candidate))
    statuses = {r.candidate: r.status for r in first.rows}
    assert statuses["θ=(.5|.5|0|.5|.5|0|0)"] == "filtered"  # ω = 0.5: not trained
    assert statuses["θ=(1|0|0|0|1|0|.5)"] == "filtered"  # ψ = 0.5
    assert statuses["dense"] == "ok"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert (
        len(rows) == len(first.rows)
        and {"theta", "omega", "psi", "nu", "params", "macs", "val_loss"} <= set(rows[0])
    )
    again: list[str] = []
    second = search(task, named=["dense", "low_rank"], paper=True, where="omega == 0 and psi == 1",
                    flops_ratio=1.0, csv_path=path, progress=False, on_row=lambda r: again.append(r.candidate))
    assert again == [] and second.resumed == len(first.rows)
    assert [r.candidate for r in second.ranked()] == [r.candidate for r in first.ranked()]
    with pytest.raises(SearchError, match="was written for a budget of .*use the same budget"):
        search(task, named=["dense"], paper=False, flops_ratio=0.5, csv_path=path, progress=False)


def test_budget_below_what_fits_is_reported_not_raised() -> None:
    task = RegressionTask(d=8, steps=2, widths=(8,))
    result = search(task, named=["dense"], paper=False, macs_per_token=10, progress=False)
    (row,) = result.rows
    assert row.status == "skipped" and "fits 10 MACs/token" in row.detail
    with pytest.raises(SearchError, match="no candidate was trained"):
        _ = result.best
