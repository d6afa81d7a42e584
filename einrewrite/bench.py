"""Side-by-side speed of a dense model and its structured rewrite, in PyTorch and in ONNX Runtime.

Everything is timed in one run, interleaved (each round times every contender once, best round kept), so that
the ratios are meaningful on a shared, noisy machine. Absolute times are indicative only.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .export import export_onnx, onnxruntime_session

__all__ = ["BenchRow", "compare_models", "format_rows", "time_interleaved"]

InputFn = Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]


def time_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Best wall time (s) of each callable over ``repeats`` interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@dataclass
class BenchRow:
    """Times (ms) of every contender at one token count."""

    tokens: int
    times_ms: dict[str, float] = field(default_factory=dict)

    def ratio(self, slower: str, faster: str) -> float | None:
        """times[slower] / times[faster], the speedup of ``faster``."""
        if slower in self.times_ms and faster in self.times_ms and self.times_ms[faster] > 0:
            return self.times_ms[slower] / self.times_ms[faster]
        return None


def compare_models(
    dense: nn.Module,
    structured: nn.Module,
    make_inputs: InputFn,
    *,
    tokens: Sequence[int] = (1, 512, 2048),
    providers: Sequence[str] | str | None = None,
    dtype: str = "float32",
    compile: bool = True,
    onnx: bool = True,
    repeats: int = 5,
    threads: int | None = None,
    workdir: str | Path | None = None,
) -> list[BenchRow]:
    """Time dense torch, structured torch eager, structured torch.compile, dense ORT and structured ORT.

    Args:
        dense: the original model.
        structured: its rewrite.
        make_inputs: tokens -> (args, kwargs) with about that many tokens.
        tokens: token counts to measure.
        providers: ONNX Runtime providers (default CPU).
        dtype: "float32" or "float16" for the ONNX models.
        compile: also time ``torch.compile(structured)``.
        onnx: also export both models and time them in ONNX Runtime.
        repeats: interleaved rounds per token count.
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
        workdir: where to write the ONNX files (default: a temporary directory).
    """
    dense, structured = dense.eval(), structured.eval()
    contenders: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], object]] = {
        "dense torch": lambda a, k: dense(*a, **k),
        "structured torch": lambda a, k: structured(*a, **k),
    }
    if compile:
        compiled = torch.compile(copy.deepcopy(structured), dynamic=True)
        contenders["structured compile"] = lambda a, k: compiled(*a, **k)
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    folder = Path(workdir or tmp.name)  # type: ignore[union-attr]
    try:
        if onnx:
            args, kwargs = make_inputs(min(tokens))
            for label, model in (("dense ORT", dense), ("structured ORT", structured)):
                path = folder / f"{label.split()[0]}.onnx"
                export_onnx(model, args, path, example_kwargs=kwargs, dtype=dtype, providers=providers)  # type: ignore[arg-type]
                session = onnxruntime_session(path, providers, threads=threads or torch.get_num_threads())
                contenders[label] = _ort_runner(session, dtype)
        rows = []
        with torch.no_grad():
            for n in tokens:
                args, kwargs = make_inputs(n)
                fns = {name: (lambda fn=fn, a=args, k=kwargs: fn(a, k)) for name, fn in contenders.items()}
                times = time_interleaved(fns, repeats=repeats)
                rows.append(BenchRow(n, {k: v * 1e3 for k, v in times.items()}))
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def _ort_runner(session: Any, dtype: str) -> Callable[[tuple[Any, ...], dict[str, Any]], object]:
    from torch.utils._pytree import tree_leaves

    names = [i.name for i in session.get_inputs()]

    def run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        feeds = {
            name: (t.half() if dtype == "float16" and t.is_floating_point() else t).numpy()
            for name, t in zip(names, tensors, strict=True)
        }
        return session.run(None, feeds)

    return run


def format_rows(rows: Sequence[BenchRow]) -> str:
    """A table of times and the ratios users ask for."""
    from .tables import format_table

    names = list(rows[0].times_ms) if rows else []
    ratios = [
        ("struct/dense torch", "dense torch", "structured torch"),
        ("struct/dense ORT", "dense ORT", "structured ORT"),
        ("ORT vs torch (struct)", "structured torch", "structured ORT"),
        ("compile vs eager", "structured torch", "structured compile"),
    ]
    header = ["tokens", *[f"{n} ms" for n in names], *[r[0] for r in ratios]]
    body = []
    for row in rows:
        cells: list[str] = [str(row.tokens), *[f"{row.times_ms[n]:.2f}" for n in names]]
        for _, slow, fast in ratios:
            value = row.ratio(slow, fast)
            cells.append("-" if value is None else f"{value:.2f}x")
        body.append(cells)
    return format_table(header, body)
