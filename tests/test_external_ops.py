"""ONNX translations of third-party custom ops: transformers' grouped_mm_fallback, exported and run in ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from einrewrite import export_onnx
from einrewrite.export import onnxruntime_session
from einrewrite.external_ops import known_translations

pytest.importorskip("transformers.integrations.moe")  # registers torch.ops.transformers.grouped_mm_fallback


class GroupedExperts(nn.Module):
    """Rows sorted by expert times each expert's (K, N) weight: the fused-expert matmul of transformers v5."""

    def __init__(self, experts: int = 4, k: int = 16, n: int = 24) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, k, n, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # (E,) end row of each expert's group
        return torch.ops.transformers.grouped_mm_fallback(x, self.weight, offs)  # (S, N)


def test_the_grouped_mm_fallback_is_known_once_transformers_registered_it() -> None:
    assert torch.ops.transformers.grouped_mm_fallback.default in known_translations()


@pytest.mark.parametrize(
    "counts, rows",
    [
        ([0, 5, 0, 3], 8),  # experts without rows
        ([2, 0, 1, 0], 5),  # two rows past offs[-1] (expert-parallel sentinels): zeros, as in the eager op
        ([0, 0, 0, 0], 3),  # nothing routed
        ([1, 1, 1, 1], 4),
    ],
)
def test_grouped_mm_exports_and_matches_eager_at_other_group_sizes(
    counts: list[int], rows: int, tmp_path: Path
) -> None:
    model = GroupedExperts().eval()
    path = tmp_path / "grouped.onnx"
    example = (torch.randn(6, 16), torch.tensor([3, 1, 0, 2]))
    report = export_onnx(model, example, path)
    assert report.checked and report.op_counts["MatMul"] == 4  # one per expert, the weights never gathered per row

    session = onnxruntime_session(path)
    x, counts_t = torch.randn(rows, 16), torch.tensor(counts)
    want = model(x, counts_t).detach().numpy()
    got = session.run(None, {i.name: v for i, v in zip(session.get_inputs(), (x.numpy(), counts_t.numpy()))})[0]
    assert got.shape == (rows, 24)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if sum(counts) < rows:
        assert not got[sum(counts):].any()
