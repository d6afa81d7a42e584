"""Interleaved timing (einrewrite.bench): the rounds, the best times and the per-round ratios."""

from __future__ import annotations

import pytest

from einrewrite import bench


def test_rounds_interleave_the_callables_after_their_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    calls: list[str] = []
    costs = {"dense": iter([9.0, 6.0, 4.0, 5.0]), "btt": iter([9.0, 2.0, 1.0, 2.0])}  # warmup first, then 3 rounds

    def runner(name: str):  # each call moves the fake clock by its cost in that round
        def run() -> None:
            calls.append(name)
            clock[0] += next(costs[name])
        return run

    times = bench.time_rounds({"dense": runner("dense"), "btt": runner("btt")}, repeats=3, warmup=1)
    assert calls == ["dense", "btt"] + ["dense", "btt"] * 3
    assert times == {"dense": [6.0, 4.0, 5.0], "btt": [2.0, 1.0, 2.0]}
    assert bench.round_ratios(times, "dense", "btt") == [3.0, 4.0, 2.5]  # paired within each round


def test_best_time_is_the_fastest_round(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    costs = iter([1.0, 7.0, 3.0, 5.0])

    def run() -> None:
        clock[0] += next(costs)

    assert bench.time_interleaved({"f": run}, repeats=3, warmup=1) == {"f": 3.0}


def test_round_ratios_need_the_same_rounds() -> None:
    with pytest.raises(ValueError):
        bench.round_ratios({"a": [1.0, 2.0], "b": [1.0]}, "a", "b")


def test_slower_than_dense_names_each_runtime_its_token_counts_and_ratios() -> None:
    rows = [
        bench.BenchRow(1, {"dense torch": 1.0, "structured torch": 4.0, "dense ORT": 1.0, "structured ORT": 2.0}),
        bench.BenchRow(512, {"dense torch": 8.0, "structured torch": 2.0, "dense ORT": 3.0, "structured ORT": 4.0}),
        bench.BenchRow(2048, {"dense torch": 9.0, "structured torch": 9.0}),  # equal is not slower; no ORT timed
    ]
    assert bench.slower_than_dense(rows) == [
        "SLOWER than dense in torch at 1 token (0.25x)",
        "SLOWER than dense in ONNX Runtime at 1, 512 tokens (0.50x, 0.75x)",
    ]
    assert bench.slower_than_dense(rows[2:]) == []
