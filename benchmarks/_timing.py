"""Interleaved best-of-N timing of several callables in one run, for side-by-side benchmarks.

A shared machine makes single timings vary by up to 2x, so the callables are timed in turns (one call of
each per round, in a rotating order) and each keeps its best time: slow phases of the machine then hit every
candidate alike, and the minimum is the figure least disturbed by other work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

__all__ = ["best_times", "format_seconds"]


def best_times(
    fns: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 1,
    number: int = 1,
    budget_s: float | None = None,
) -> dict[str, float]:
    """Time every callable in interleaved rounds and return each one's best time per call, in seconds.

    Args:
        fns: name -> zero-argument callable; each call is one measured unit of work.
        repeats: number of rounds; every callable runs ``number`` times per round.
        warmup: untimed calls of each callable before the first round (allocator, caches, lazy init).
        number: calls per timed sample (the sample is divided by it); raise it for very short callables.
        budget_s: stop after the round in which this many seconds have passed (at least one round runs).

    Returns:
        name -> best seconds per call, in the order of ``fns``.

    Examples:
        >>> times = best_times({"a": lambda: sum(range(100)), "b": lambda: sum(range(1000))}, repeats=3)
        >>> sorted(times) == ["a", "b"] and all(t > 0 for t in times.values())
        True
    """
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(f"repeats and number must be >= 1 and warmup >= 0, got {repeats}, {number}, {warmup}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    best = dict.fromkeys(names, float("inf"))
    start = time.perf_counter()
    for round_index in range(repeats):
        shift = round_index % len(names)  # rotate so no callable always runs right after the same one
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / number)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return best


def format_seconds(seconds: float) -> str:
    """A time with a unit that keeps three significant digits (``"1.23 ms"``).

    Examples:
        >>> format_seconds(0.00123)
        '1.23 ms'
    """
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"
