"""Side-by-side speed of a dense model and its structured rewrite, in PyTorch and in ONNX Runtime.

Everything is timed in one run, interleaved (each round times every contender once, best round kept), so that
the ratios are meaningful on a shared, noisy machine. Absolute times are indicative only.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from .config import ConfigError
from .export import export_onnx, onnxruntime_session, resolve_providers
from .inputs import default_example_inputs, split_inputs

__all__ = [
    "BenchRow",
    "bench_saved",
    "compare_models",
    "format_rows",
    "max_sequence_length",
    "resize_inputs",
    "round_ratios",
    "slower_than_dense",
    "time_interleaved",
    "time_rounds",
]

InputFn = Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]


def time_rounds(
    fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall time (s) of each callable in each of ``repeats`` interleaved rounds.

    Round i runs every callable once, back to back, so the i-th times of two callables saw about the same machine
    load: their ratios round by round (:func:`round_ratios`) stay steady where the load drifts.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Best wall time (s) of each callable over ``repeats`` interleaved rounds (:func:`time_rounds`)."""
    return {name: min(times) for name, times in time_rounds(fns, repeats=repeats, warmup=warmup).items()}


def round_ratios(times: dict[str, list[float]], slower: str, faster: str) -> list[float]:
    """``slower / faster`` in each round of :func:`time_rounds`: the speedup of ``faster``, round by round.

    Examples:
        >>> round_ratios({"dense": [3.0, 4.0], "btt": [1.0, 2.0]}, "dense", "btt")
        [3.0, 2.0]
    """
    return [s / f for s, f in zip(times[slower], times[faster], strict=True)]


@dataclass
class BenchRow:
    """Times (ms) of every contender at one token count."""

    tokens: int
    times_ms: dict[str, float] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None  # (batch, seq) of the timed inputs, when known

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict with the times and the ratios of :func:`format_rows`."""
        data = asdict(self)
        data["ratios"] = {name: self.ratio(slow, fast) for name, slow, fast in _RATIOS}
        return data

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
    export_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    device: str | torch.device | None = None,
    opset: int | None = None,
    atol: float | None = None,
    flush_denormals: bool = True,
) -> list[BenchRow]:
    """Time dense torch, structured torch eager, structured torch.compile, dense ORT and structured ORT.

    Args:
        dense: the original model.
        structured: its rewrite.
        make_inputs: tokens -> (args, kwargs) with about that many tokens.
        tokens: token counts to measure.
        providers: ONNX Runtime providers (default CPU).
        dtype: "float32" or "float16" for the ONNX models (and the torch models on a GPU).
        compile: also time ``torch.compile(structured)``.
        onnx: also export both models and time them in ONNX Runtime.
        repeats: interleaved rounds per token count.
        threads: ONNX Runtime intra-op threads (default: torch's thread count).
        workdir: where to write the ONNX files (default: a temporary directory).
        export_inputs: (args, kwargs) to export with; use a batch and a sequence of at least 2 each, since
            torch.export specialises axes of size 1 (default: ``make_inputs(max(tokens))``).
        device: where the torch models run (default CPU); ``"cuda"`` casts them to ``dtype`` as well.
        opset: ONNX opset of both exports (default: the exporter's).
        atol: absolute tolerance of both exports' parity checks (default: :func:`export_onnx`'s for ``dtype``).
        flush_denormals: the ONNX Runtime sessions flush denormal floats to zero, as :mod:`einrewrite.denormals`
            recommends for ORT on the CPU (a causal attention's masked softmax runs about 4x faster); torch runs as
            it is.

    Returns:
        One :class:`BenchRow` per token count; :func:`format_rows` prints them.

    Examples:
        >>> import torch
        >>> dense = torch.nn.Linear(64, 64)
        >>> rows = compare_models(dense, dense, lambda n: ((torch.randn(n, 64),), {}), tokens=(4,),
        ...                       compile=False, onnx=False, repeats=1)
        >>> sorted(rows[0].times_ms)
        ['dense torch', 'structured torch']
    """
    device = torch.device(device or "cpu")
    dense, structured = dense.eval(), structured.eval()
    if device.type == "cuda":
        torch_dtype = torch.float16 if dtype == "float16" else torch.float32
        dense = copy.deepcopy(dense).to(device, torch_dtype)
        structured = copy.deepcopy(structured).to(device, torch_dtype)

    def on_device(tree: Any) -> Any:
        if device.type != "cuda":
            return tree
        cast = torch.float16 if dtype == "float16" else torch.float32
        return tree_map(
            lambda t: (t.to(device, cast) if t.is_floating_point() else t.to(device)) if isinstance(t, Tensor) else t,
            tree,
        )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    contenders: dict[str, Callable[[tuple[Any, ...], dict[str, Any]], object]] = {
        "dense torch": lambda a, k: (dense(*a, **k), sync()),
        "structured torch": lambda a, k: (structured(*a, **k), sync()),
    }
    if compile:
        compiled = torch.compile(copy.deepcopy(structured), dynamic=True)
        contenders["structured compile"] = lambda a, k: (compiled(*a, **k), sync())
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    folder = Path(workdir or tmp.name)  # type: ignore[union-attr]
    try:
        if onnx:
            args, kwargs = export_inputs if export_inputs is not None else make_inputs(max(tokens))
            for label, model in (("dense ORT", dense), ("structured ORT", structured)):
                path = folder / f"{label.split()[0]}.onnx"
                cpu_model = copy.deepcopy(model).float().cpu() if device.type == "cuda" else model
                export_onnx(cpu_model, args, path, example_kwargs=kwargs, dtype=dtype,  # type: ignore[arg-type]
                            providers=providers, opset=opset, atol=atol)
                session = onnxruntime_session(
                    path, providers, threads=threads or torch.get_num_threads(), stop_spinning=True,
                    flush_denormals=flush_denormals,
                )  # timed in turn with the other contenders
                contenders[label] = _ort_runner(session, dtype)
        rows = []
        with torch.no_grad():
            for n in tokens:
                args, kwargs = make_inputs(n)
                shape = _shape_of(args, kwargs)
                args, kwargs = on_device((args, kwargs))
                fns = {name: (lambda fn=fn, a=args, k=kwargs: fn(a, k)) for name, fn in contenders.items()}
                times = time_interleaved(fns, repeats=repeats)
                rows.append(BenchRow(n, {k: v * 1e3 for k, v in times.items()}, shape))
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


def _shape_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    first = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)), None)
    return None if first is None else tuple(first.shape)


def _ort_runner(session: Any, dtype: str) -> Callable[[tuple[Any, ...], dict[str, Any]], object]:
    names = [i.name for i in session.get_inputs()]

    def run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        feeds = {
            name: (t.half() if dtype == "float16" and t.is_floating_point() else t).cpu().numpy()
            for name, t in zip(names, tensors, strict=True)
        }
        return session.run(None, feeds)

    return run


_RATIOS = (
    ("struct/dense torch", "dense torch", "structured torch"),
    ("struct/dense ORT", "dense ORT", "structured ORT"),
    ("ORT vs torch (struct)", "structured torch", "structured ORT"),
    ("compile vs eager", "structured torch", "structured compile"),
)


def format_rows(rows: Sequence[BenchRow]) -> str:
    """A table of times (ms) and the speedups users ask for (``a/b`` = time of b over time of a).

    Columns: every contender's time, then ``struct/dense torch`` (structured eager over dense eager),
    ``struct/dense ORT``, ``ORT vs torch (struct)`` (structured ORT over structured eager) and ``compile vs eager``.
    """
    from .tables import format_table

    names = list(rows[0].times_ms) if rows else []
    header = ["tokens", "shape", *[f"{n} ms" for n in names], *[r[0] for r in _RATIOS]]
    body = []
    for row in rows:
        shape = "x".join(str(d) for d in row.shape[:2]) if row.shape else "-"
        cells: list[str] = [str(row.tokens), shape, *[f"{row.times_ms[n]:.2f}" for n in names]]
        for _, slow, fast in _RATIOS:
            value = row.ratio(slow, fast)
            cells.append("-" if value is None else f"{value:.2f}x")
        body.append(cells)
    return format_table(header, body)


def slower_than_dense(rows: Sequence[BenchRow]) -> list[str]:
    """One line per runtime (torch, ONNX Runtime) in which the rewrite ran slower than the dense model, naming the
    token counts and the ratios: fewer FLOPs that run slower are what users report first, so a table cell alone is
    not enough.

    Examples:
        >>> rows = [BenchRow(1, {"dense ORT": 1.0, "structured ORT": 2.0}),
        ...         BenchRow(512, {"dense ORT": 8.0, "structured ORT": 2.0})]
        >>> slower_than_dense(rows)
        ['SLOWER than dense in ONNX Runtime at 1 token (0.50x)']
    """
    lines = []
    for runtime, dense, structured in (("torch", "dense torch", "structured torch"),
                                       ("ONNX Runtime", "dense ORT", "structured ORT")):
        slow = [(row.tokens, ratio) for row in rows if (ratio := row.ratio(dense, structured)) is not None and ratio < 1]
        if slow:
            counts = ", ".join(str(tokens) for tokens, _ in slow)
            ratios = ", ".join(f"{ratio:.2f}x" for _, ratio in slow)
            plural = "" if [tokens for tokens, _ in slow] == [1] else "s"
            lines.append(f"SLOWER than dense in {runtime} at {counts} token{plural} ({ratios})")
    return lines


# ---- inputs of a given token count ---------------------------------------------------------------------
def max_sequence_length(model: nn.Module) -> int | None:
    """The longest sequence the model accepts (``block_size``, ``n_positions``, ...), None when unbounded."""
    for owner in (model, getattr(model, "config", None)):
        for name in ("block_size", "n_positions", "max_position_embeddings"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _split_tokens(tokens: int, max_seq: int | None) -> tuple[int, int]:
    """(batch, seq) with batch·seq close to ``tokens`` and seq <= ``max_seq``."""
    if max_seq is None or tokens <= max_seq:
        return 1, tokens
    batch = math.ceil(tokens / max_seq)
    return batch, tokens // batch


def resize_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], tokens: int, *, max_seq: int | None = None, seed: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs like ``(args, kwargs)`` but with about ``tokens`` tokens.

    The first tensor decides the token axes: ``(B, S)`` for integer ids, ``(B, S, d)`` or ``(N, d)`` for
    features. Tokens become a batch of sequences of at most ``max_seq`` (``tokens`` ≤ ``max_seq``: one
    sequence). Every tensor sharing those leading axes gets the new sizes and fresh values: ids drawn from the
    range the example used, constant tensors (attention masks) kept constant, features from N(0, 1).

    Raises:
        ConfigError: no tensor input, or one whose token axes are unclear (e.g. images).

    Examples:
        >>> import torch
        >>> args, kwargs = resize_inputs((), {"input_ids": torch.zeros(2, 8, dtype=torch.long)}, 128, max_seq=64)
        >>> tuple(kwargs["input_ids"].shape)
        (2, 64)
    """
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    if not tensors:
        raise ConfigError("example inputs: no tensor to resize; pass token ids (B, S) or features (..., d)")
    first = tensors[0]
    n_token_axes = min(first.ndim, 2) if not first.is_floating_point() else min(first.ndim - 1, 2)
    if n_token_axes < 1 or (first.is_floating_point() and first.ndim > 3):
        raise ConfigError(
            f"example inputs: cannot tell the token axes of a {first.dtype} tensor of shape {tuple(first.shape)}; "
            "bench and resize need token ids (B, S) or features (N, d) / (B, S, d)"
        )
    old = tuple(first.shape[:n_token_axes])
    new = _split_tokens(tokens, max_seq) if n_token_axes == 2 else (tokens,)
    generator = torch.Generator().manual_seed(seed)

    def resize(value: Any) -> Any:
        if not isinstance(value, Tensor) or tuple(value.shape[:n_token_axes]) != old:
            return value
        shape = (*new, *value.shape[n_token_axes:])
        if value.is_floating_point():
            return torch.randn(shape, generator=generator, dtype=value.dtype).to(value.device)
        low, high = int(value.min()), int(value.max())
        if low == high:
            return torch.full(shape, low, dtype=value.dtype, device=value.device)
        return torch.randint(low, high + 1, shape, generator=generator, dtype=value.dtype).to(value.device)

    return tree_map(resize, (args, kwargs))


# ---- an einrewrite output directory ---------------------------------------------------------------------
def bench_saved(
    out_dir: str | os.PathLike[str],
    *,
    tokens: Sequence[int] = (1, 512, 2048),
    repeats: int = 5,
    providers: Sequence[str] | str | None = None,
    dtype: str = "float32",
    compile: bool = True,
    onnx: bool = True,
    threads: int | None = None,
    opset: int | None = None,
    atol: float | None = None,
    flush_denormals: bool = True,
) -> list[BenchRow]:
    """:func:`compare_models` on an einrewrite output directory: its dense base model against the rewrite.

    The dense base is rebuilt as ``load_pretrained`` rebuilds it (factory or ``config.json``); the example
    inputs are the saved or factory ones (else dummy Hugging Face inputs), resized to each token count.

    Args:
        out_dir: a directory written by ``einrewrite rewrite -o`` / ``save_pretrained``.
        tokens: token counts to time.
        repeats: interleaved rounds per token count.
        providers: ONNX Runtime providers (``"cpu"``, ``"cuda"`` or full names); with CUDA the torch models run
            on the GPU too.
        dtype: ``"float32"`` or ``"float16"``.
        compile: also time ``torch.compile`` of the rewrite.
        onnx: also export both models and time them in ONNX Runtime.
        threads: ONNX Runtime intra-op threads (default: torch's).
        opset: ONNX opset of both exports (default: the exporter's).
        atol: absolute tolerance of both exports' parity checks (default: the exporter's for ``dtype``).
        flush_denormals: the ONNX Runtime sessions flush denormal floats to zero (:func:`compare_models`).

    Raises:
        SavedModelError: not an einrewrite directory. ExportError: a provider is missing or an export fails.
        ConfigError: no usable example inputs.

    Examples:
        >>> print(format_rows(bench_saved("out/tiny_gpt_btt", tokens=(64,))))  # doctest: +SKIP
    """
    from .api import load_base_model, load_pretrained

    names = resolve_providers(providers) if onnx else []  # fail fast on a missing provider
    base = load_base_model(out_dir)
    structured = load_pretrained(out_dir).eval()
    inputs = split_inputs(getattr(structured.einrewrite_report, "example_inputs", None) or base.example_inputs)
    inputs = inputs or default_example_inputs(base.model)
    if inputs is None:
        raise ConfigError(
            f"{out_dir}: no example inputs (none saved, no factory inputs, not a Hugging Face model); rewrite from a "
            "factory that returns (model, example_inputs)"
        )
    args, kwargs = inputs
    max_seq = max_sequence_length(base.model)
    device = "cuda" if names and names[0] == "CUDAExecutionProvider" and torch.cuda.is_available() else None
    return compare_models(
        base.model,
        structured,
        lambda n: resize_inputs(args, kwargs, n, max_seq=max_seq),
        tokens=tokens,
        providers=names or None,
        dtype=dtype,
        compile=compile,
        onnx=onnx,
        repeats=repeats,
        threads=threads,
        export_inputs=(tuple(args), dict(kwargs)),
        device=device,
        opset=opset,
        atol=atol,
        flush_denormals=flush_denormals,
    )
