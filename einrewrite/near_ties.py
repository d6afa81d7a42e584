"""Near-tied BTT-MoE routing: the rows of an example a parity check cannot hold to a tolerance.

A BTT-MoE layer sends each token to its top-k experts by router score. Where the k-th score and the next one are
closer than rounding can keep apart, ONNX Runtime and PyTorch may pick different experts for that token. Its
output then differs by as much as two experts do, and in a model that mixes tokens (attention) so do the outputs
of the tokens that read it, in the same row of the batch. That is no export error: the d=1024, 4-layer benchmark
GPT with random routers, exported once and run on 12 inputs of 8x256 tokens, matched PyTorch within 1e-5 on 11;
on the twelfth, one token had its 2nd and 3rd router scores 1.9e-7 apart, and its row differed by up to 1.16.

:func:`recording_near_ties` records, during the parity check's PyTorch forward, which rows of the example hold a
token whose margin at the top-k cut is within :func:`tie_tolerance` of the score. :meth:`NearTies.excused`
then says whether the rows where ONNX Runtime disagrees are all such rows, so that
:func:`einrewrite.export_onnx` can accept the check on the other rows and say which it could not hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from .moe import BTTMoELinear

__all__ = ["NearTie", "NearTies", "recording_near_ties", "routing_margins", "tie_tolerance"]

_ROUNDING_STEPS = 100  # how many units of rounding a margin may be and still be flipped (see tie_tolerance)


def tie_tolerance(dtype: torch.dtype) -> float:
    """The relative margin below which a routing decision is near-tied in ``dtype``: 100 units of rounding.

    In float32 (1.2e-5) that is about 10x the router-logit gap between PyTorch in float32 and in float64
    measured on the d=1024 benchmark GPT (up to 5e-6 on logits of 2-5).

    Examples:
        >>> f"{tie_tolerance(torch.float32):.1e}", f"{tie_tolerance(torch.float16):.1e}"
        ('1.2e-05', '9.8e-02')
    """
    return _ROUNDING_STEPS * torch.finfo(dtype).eps


def routing_margins(logits: Tensor, top_k: int) -> Tensor:
    """Each token's gap between its k-th and (k+1)-th router score, relative to the k-th score (at least 1).

    A token whose scores are all equal (a zero router) goes to experts ``0..k-1`` on every path
    (:func:`~einrewrite.moe.route` breaks ties by index, as ONNX ``ArgMax`` does): its margin is ``inf``, as is
    every token's when there are only k experts.

    Args:
        logits: (N, E) router scores.
        top_k: k.

    Returns:
        (N,) float32 margins.

    Examples:
        >>> routing_margins(torch.tensor([[3.0, 1.0, 0.5], [0.0, 0.0, 0.0]]), 2).tolist()
        [0.5, inf]
    """
    scores = logits.detach().float().sort(dim=-1, descending=True).values  # (N, E)
    if scores.shape[-1] <= top_k:
        return torch.full(scores.shape[:1], float("inf"))
    cut = scores[:, top_k - 1]  # (N,) the last score taken
    margin = (cut - scores[:, top_k]) / cut.abs().clamp_min(1.0)  # (N,)
    constant = scores[:, 0] == scores[:, -1]  # (N,)
    return torch.where(constant, torch.full_like(margin, float("inf")), margin)


@dataclass(frozen=True)
class NearTie:
    """The closest routing decision of one row: its layer, the layer's k, and the relative margin."""

    layer: str
    top_k: int
    margin: float

    def describe(self) -> str:
        """E.g. ``"h.3.mlp.c_fc: top-2 cut 1.9e-07 apart"``."""
        return f"{self.layer}: top-{self.top_k} cut {self.margin:.1e} apart"


@dataclass
class NearTies:
    """Rows (along axis 0 of the BTT-MoE layers' inputs) holding a near-tied token, with the closest one in each.

    When no layer ran or the layers disagree on the number of rows (:attr:`batch` is None), no row can be told
    apart and :meth:`excused` excuses nothing.
    """

    rows: dict[int, NearTie] = field(default_factory=dict)
    batches: set[int] = field(default_factory=set)  # the number of rows each layer call had

    @property
    def batch(self) -> int | None:
        """The layers' number of rows; None when no layer ran or they disagree."""
        return next(iter(self.batches)) if len(self.batches) == 1 else None

    def add(self, layer: str, top_k: int, lead: tuple[int, ...], margins: Tensor, tolerance: float) -> None:
        """Record one layer call: ``lead`` its input's leading shape, ``margins`` (N,) by :func:`routing_margins`."""
        rows = lead[0] if lead else 1
        self.batches.add(rows)
        per_row = max(1, margins.numel() // max(1, rows))
        for token in torch.nonzero(margins <= tolerance).reshape(-1).tolist():
            row, margin = token // per_row, float(margins[token])
            if row not in self.rows or margin < self.rows[row].margin:
                self.rows[row] = NearTie(layer, top_k, margin)

    def excused(self, mismatch: np.ndarray) -> list[int] | None:
        """The rows of ``mismatch`` (an output's elementwise failures, rows along axis 0) that fail, when every
        one of them holds a near-tied token; None when some failing row holds none, or rows cannot be matched
        (an output without ``batch`` rows)."""
        if self.batch is None or not self.rows or mismatch.ndim == 0 or mismatch.shape[0] != self.batch:
            return None
        failing = np.nonzero(mismatch.reshape(self.batch, -1).any(axis=1))[0].tolist()
        return failing if failing and all(r in self.rows for r in failing) else None

    def closest(self, rows: list[int]) -> NearTie:
        """The closest tie among ``rows`` (all recorded)."""
        return min((self.rows[r] for r in rows), key=lambda tie: tie.margin)


@contextlib.contextmanager
def recording_near_ties(model: nn.Module, dtype: torch.dtype) -> Iterator[NearTies]:
    """Record the near-tied tokens of every :class:`~einrewrite.moe.BTTMoELinear` in ``model`` while the context
    is open (hooks on each layer and its router), at :func:`tie_tolerance` of ``dtype``."""
    ties, tolerance = NearTies(), tie_tolerance(dtype)
    leads: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BTTMoELinear):
            continue

        def remember(_layer: nn.Module, inputs: tuple[Tensor, ...], name: str = name) -> None:
            leads[name] = tuple(inputs[0].shape[:-1])

        def record(_router: nn.Module, _inputs: object, logits: Tensor, name: str = name, k: int = layer.top_k) -> None:
            ties.add(name, k, leads.get(name, ()), routing_margins(logits, k), tolerance)

        handles += [layer.register_forward_pre_hook(remember), layer.router.register_forward_hook(record)]
    try:
        yield ties
    finally:
        for handle in handles:
            handle.remove()
