"""Compute-optimal frontiers and power-law fits of (compute, loss) points (paper-notes §5.3).

Every evaluation of every run is a point (training compute C, validation loss L). For one structure the
**frontier** keeps the points no other point beats with less or equal compute (the lower-left staircase); a
**power law** ``L = a · C^(-b) (+ c)`` is then fitted to the frontier in log space:

* without an offset: least squares of ``log L = log a − b · log C``;
* with an offset (``offset="fit"``): ``c`` is searched in ``[0, min L)`` (golden section on the residual of the
  log-log fit of ``L − c``), then ``a, b`` by least squares as above. A fixed ``offset=c`` is also accepted.

The paper's notebooks take a convex hull in log-log space and add back points within 5% of it; the plain
Pareto staircase used here keeps only points that improve on every cheaper point, which is what the fit needs
and has no tolerance to tune. Only numpy is used (no scipy).

Examples:
    >>> pts = [(1e6, 3.0), (1e7, 3.0 * 10 ** -0.2), (1e8, 3.0 * 10 ** -0.4), (1e8, 4.0)]
    >>> law = fit_power_law(pareto_frontier(pts))
    >>> round(law.b, 6), len(pareto_frontier(pts))
    (0.2, 3)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import EinrewriteError

__all__ = ["FitError", "PowerLaw", "compute_multiplier", "fit_power_law", "pareto_frontier"]

Point = tuple[float, float]


class FitError(EinrewriteError, ValueError):
    """Too few or invalid points for a frontier or a fit (the message says what is needed)."""


def pareto_frontier(points: Iterable[Sequence[float]]) -> list[Point]:
    """The compute-optimal points: each has a lower loss than every point with less or equal compute.

    Args:
        points: ``(compute, loss)`` pairs; non-finite or non-positive compute values are dropped.

    Returns:
        The frontier sorted by compute (losses strictly decreasing).

    Examples:
        >>> pareto_frontier([(1, 5.0), (2, 6.0), (3, 4.0), (3, 4.5), (4, 4.0)])
        [(1.0, 5.0), (3.0, 4.0)]
    """
    clean = sorted(
        (float(c), float(loss)) for c, loss in points if math.isfinite(c) and math.isfinite(loss) and c > 0
    )  # by compute, then loss: the best point of a compute value comes first
    frontier: list[Point] = []
    for c, loss in clean:
        if not frontier or loss < frontier[-1][1]:
            frontier.append((c, loss))
    return frontier


@dataclass(frozen=True)
class PowerLaw:
    """``loss = a · compute^(-b) + c``, fitted in log space.

    Attributes:
        a: scale.
        b: exponent (positive when loss falls with compute).
        c: irreducible-loss offset (0 without one).
        r2: R² of the log-log fit of ``loss − c``.
        n: number of points fitted.
    """

    a: float
    b: float
    c: float
    r2: float
    n: int

    def __call__(self, compute: float | np.ndarray) -> float | np.ndarray:
        """The fitted loss at ``compute``."""
        return self.a * np.power(compute, -self.b) + self.c

    def compute_for(self, loss: float) -> float:
        """The compute at which the law reaches ``loss`` (inf when ``loss`` ≤ c)."""
        if loss <= self.c or self.b <= 0:
            return math.inf
        return float((self.a / (loss - self.c)) ** (1.0 / self.b))

    def describe(self) -> str:
        """``L = 12.3·C^-0.081 + 0.5 (R² 0.98, 7 pts)``."""
        offset = f" + {self.c:.3g}" if self.c else ""
        return f"L = {self.a:.4g}·C^-{self.b:.4f}{offset} (R² {self.r2:.3f}, {self.n} pts)"


def _loglog(compute: np.ndarray, loss: np.ndarray) -> tuple[float, float, float]:
    """(log a, b, residual sum of squares) of ``log loss = log a − b·log compute``."""
    x, y = np.log(compute), np.log(loss)
    design = np.stack([np.ones_like(x), -x], axis=1)  # (n, 2)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef  # (n,)
    return float(coef[0]), float(coef[1]), float(resid @ resid)


def fit_power_law(
    points: Iterable[Sequence[float]],
    *,
    offset: float | Literal["fit"] | None = None,
    compute_range: tuple[float, float] | None = None,
) -> PowerLaw:
    """Fit ``loss = a · compute^(-b) (+ c)`` to points (usually a :func:`pareto_frontier`).

    Args:
        points: ``(compute, loss)`` pairs.
        offset: None (c = 0), a fixed ``c``, or ``"fit"`` to search ``c`` in ``[0, min loss)``.
        compute_range: only fit points with compute in ``[lo, hi]`` (the paper's fitting window).

    Raises:
        FitError: fewer than 2 usable points (3 with ``offset="fit"``), or a loss not above the offset.

    Examples:
        >>> pts = [(c, 2.0 * c ** -0.3 + 1.0) for c in (1e2, 1e3, 1e4, 1e5, 1e6)]
        >>> law = fit_power_law(pts, offset="fit")
        >>> round(law.a, 3), round(law.b, 3), round(law.c, 3)
        (2.0, 0.3, 1.0)
    """
    pts = [(float(c), float(loss)) for c, loss in points if math.isfinite(c) and math.isfinite(loss) and c > 0]
    if compute_range is not None:
        lo, hi = compute_range
        pts = [p for p in pts if lo <= p[0] <= hi]
    need = 3 if offset == "fit" else 2
    if len(pts) < need or len({p[0] for p in pts}) < 2:
        raise FitError(
            f"fit_power_law: {len(pts)} usable points at {len({p[0] for p in pts})} distinct compute values; "
            f"need at least {need} points at 2 or more compute values (train longer or evaluate more often)"
        )
    compute = np.array([p[0] for p in pts])
    loss = np.array([p[1] for p in pts])
    if offset == "fit":
        c = _search_offset(compute, loss)
    else:
        c = float(offset or 0.0)
    if np.any(loss <= c):
        raise FitError(f"fit_power_law: offset c = {c:.4g} is not below every loss (min {loss.min():.4g}); lower it")
    log_a, b, rss = _loglog(compute, loss - c)
    y = np.log(loss - c)
    tss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - rss / tss if tss > 0 else 1.0
    return PowerLaw(a=math.exp(log_a), b=b, c=c, r2=r2, n=len(pts))


def _search_offset(compute: np.ndarray, loss: np.ndarray) -> float:
    """The c in [0, min loss) whose log-log fit of ``loss − c`` has the least residual (golden section)."""
    hi = float(loss.min()) * (1 - 1e-9)

    def rss(c: float) -> float:
        return _loglog(compute, loss - c)[2]

    grid = np.linspace(0.0, hi, 65)[:-1]  # coarse grid first: the residual need not be unimodal on all of it
    k = int(np.argmin([rss(float(c)) for c in grid]))
    lo_c, hi_c = float(grid[max(0, k - 1)]), float(grid[k + 1]) if k + 1 < len(grid) else hi
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = hi_c - ratio * (hi_c - lo_c), lo_c + ratio * (hi_c - lo_c)
    f1, f2 = rss(x1), rss(x2)
    for _ in range(100):
        if f1 < f2:
            hi_c, x2, f2 = x2, x1, f1
            x1 = hi_c - ratio * (hi_c - lo_c)
            f1 = rss(x1)
        else:
            lo_c, x1, f1 = x1, x2, f2
            x2 = lo_c + ratio * (hi_c - lo_c)
            f2 = rss(x2)
    return (lo_c + hi_c) / 2


def compute_multiplier(reference: PowerLaw, frontier: Sequence[Point]) -> list[float]:
    """For each frontier point, the compute ``reference`` needs for the same loss divided by the point's compute.

    Above 1 means the frontier's structure reaches that loss with less compute than the reference (dense), as in
    the paper's Fig. 6 (middle).

    Examples:
        >>> dense = PowerLaw(a=10.0, b=0.1, c=0.0, r2=1.0, n=5)
        >>> [round(m, 6) for m in compute_multiplier(dense, [(1e6, float(dense(4e6)))])]
        [4.0]
    """
    return [reference.compute_for(loss) / c for c, loss in frontier]
