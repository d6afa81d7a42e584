"""Near-tied BTT-MoE routing (einrewrite.near_ties): which rows of an example hold a routing decision that rounding
may flip, and how export_onnx's parity check leaves out the rows that differ only because of one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import einrewrite.export as export_module
from einrewrite import export_onnx
from einrewrite.errors import ExportError
from einrewrite.moe import BTTMoELinear
from einrewrite.near_ties import NearTie, recording_near_ties, routing_margins, tie_tolerance

_TIED = [3.0, 1.0 + 1e-7, 1.0, 0.0]  # router scores of a near-tied token: 2nd and 3rd 1.2e-7 apart in float32
_CLEAR = [3.0, 2.0, 1.0, 0.0]  # 2nd and 3rd 1.0 apart


def _router_sees_first_features(layer: BTTMoELinear) -> BTTMoELinear:
    """Make the router's scores the first E input features, so that an input sets them."""
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(layer.num_experts, layer.in_features))
    return layer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_router_sees_first_features(BTTMoELinear(8, 8, num_experts=4, top_k=2))).eval()


def _tokens(rows: int, tied: dict[int, int]) -> torch.Tensor:
    """(rows, 4, 8) inputs with clear routing but for token ``tied[row]`` of each listed row."""
    x = torch.randn(rows, 4, 8)
    x[..., :4] = torch.tensor(_CLEAR)
    for row, token in tied.items():
        x[row, token, :4] = torch.tensor(_TIED)
    return x


def test_margins_are_relative_gaps_at_the_top_k_cut() -> None:
    margins = routing_margins(torch.tensor([_CLEAR, [-4.0, -2.0, -1.0, 1.0], [0.0] * 4]), 2)
    # (2 - 1) / 2: the gap over the cut's score 2; (-1 - -2) / 1: scaled by at least 1
    torch.testing.assert_close(margins[:2], torch.tensor([0.5, 1.0]))
    assert math.isinf(margins[2])  # a zero router: ties broken by index everywhere
    assert math.isinf(routing_margins(torch.randn(3, 2), 2)[0])  # k = E: nothing is cut
    assert tie_tolerance(torch.float16) > 1000 * tie_tolerance(torch.float32)


def test_the_rows_holding_a_near_tie_are_recorded_with_the_closest_one() -> None:
    model = _model()
    with torch.no_grad(), recording_near_ties(model, torch.float32) as ties:
        model(_tokens(3, {2: 1}))
    assert ties.batch == 3 and list(ties.rows) == [2]
    tie = ties.rows[2]
    assert tie.layer == "0" and tie.top_k == 2 and 0 < tie.margin < tie_tolerance(torch.float32)
    assert not model[0]._forward_pre_hooks and not model[0].router._forward_hooks  # hooks removed

    with recording_near_ties(model, torch.float32) as flat, torch.no_grad():
        model(_tokens(3, {2: 1}).reshape(12, 8))  # 2-D input: each token is a row
    assert list(flat.rows) == [9]


def test_only_failing_rows_that_all_hold_a_near_tie_are_excused() -> None:
    model = _model()
    with torch.no_grad(), recording_near_ties(model, torch.float32) as ties:
        model(_tokens(3, {0: 3, 2: 1}))
    failing = np.zeros((3, 4, 8), dtype=bool)
    failing[2, 1:] = True
    assert ties.excused(failing) == [2]
    failing[1, 0, 0] = True  # row 1 holds no near tie
    assert ties.excused(failing) is None
    assert ties.excused(np.ones((4, 8), dtype=bool)) is None  # not one row per example row
    assert ties.closest([0, 2]) == min(ties.rows.values(), key=lambda t: t.margin)
    assert isinstance(ties.closest([0]), NearTie)


class _Disagrees:
    """An ONNX Runtime session whose first output is off by 1 in the given rows, as a flipped routing leaves it."""

    def __init__(self, session: Any, rows: list[int]) -> None:
        self._session, self._rows = session, rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, *args: Any, **kwargs: Any) -> list[Any]:
        outputs = self._session.run(*args, **kwargs)
        outputs[0][self._rows] += 1.0
        return outputs


def _export_disagreeing_in(
    rows: list[int], x: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str = "float32"
) -> Any:
    real = export_module.onnxruntime_session
    monkeypatch.setattr(export_module, "onnxruntime_session", lambda *a, **k: _Disagrees(real(*a, **k), rows))
    return export_onnx(_model(), (x,), tmp_path / "moe.onnx", dtype=dtype)


def test_export_leaves_out_the_rows_a_near_tie_explains_and_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = _export_disagreeing_in([2], _tokens(3, {2: 1}), tmp_path, monkeypatch)
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff < 1e-5  # rows 0 and 1
    assert report.unchecked is not None and "rows [2] of the input [3, 4, 8]" in report.unchecked
    assert "near-tied (closest: 0: top-2 cut 1.2e-07 apart)" in report.unchecked
    assert "WARNING: not checked: rows [2]" in report.summary()


def test_export_still_fails_where_a_row_without_a_near_tie_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ExportError, match="the export is not faithful"):
        _export_disagreeing_in([1, 2], _tokens(3, {2: 1}), tmp_path, monkeypatch)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_an_example_whose_every_row_differs_at_a_near_tie_cannot_check_the_export(
    dtype: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ExportError, match=r"differs in every row of the input \[2, 4, 8\].*near-tied.*"
                       r"export from another example") as raised:
        _export_disagreeing_in([0, 1], _tokens(2, {0: 0, 1: 2}), tmp_path, monkeypatch, dtype)
    assert ("check the float32 export" in str(raised.value)) == (dtype == "float16")
