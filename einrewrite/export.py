"""ONNX export of structured models, checked by onnx.checker and by ONNX Runtime against PyTorch.

Structured layers lower to MatMul / Reshape / Transpose chains with pre-arranged weights (see
:mod:`einrewrite.lowering`), never to a raw ``Einsum`` node, which ONNX Runtime runs slowly and rejects in
bf16 (ecosystem-notes §3.2). Execution providers are always explicit, and nodes that an accelerator provider
left to the CPU are reported.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from . import moe_lowering
from .denormals import flushing_denormals
from .errors import ExportError
from .external_ops import known_translations
from .handoff import hand_off_feature_major
from .inputs import default_example_inputs, split_inputs
from .lowering import ONNX_TRANSLATIONS, is_lowered_weight, onnx_lowering
from .moe import BTTMoELinear
from .moe_lowering import MoEGrouping, check_grouping, chooses_by_token_count
from .near_ties import NearTies, recording_near_ties

__all__ = [
    "OPTIMIZE_MAX_NODES",
    "ExportReport",
    "export_onnx",
    "export_saved",
    "node_module_scopes",
    "onnxruntime_session",
    "resolve_providers",
]

log = logging.getLogger(__name__)

_PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# export_onnx(optimize=None) runs onnxscript's full optimizer up to this many nodes (If branches included), and only
# its constant folding on larger graphs. Its multi-output rewrite rule (SlicesSplit) walks the whole graph for every
# node: ~0.7 µs·nodes² per pass here, 45 s at 8110 nodes.
OPTIMIZE_MAX_NODES = 3000
_TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 2e-2)}  # (atol, rtol) of the parity check
_STRUCTURED_CLASSES = ("EinsumLinear", "BTTMoELinear")


@dataclass
class ExportReport:
    """What :func:`export_onnx` did: the file, its ops, where ONNX Runtime placed them, and the parity check."""

    path: str
    dtype: str
    opset: int
    op_counts: dict[str, int]
    einsum_nodes: list[str] = field(default_factory=list)
    providers_requested: list[str] = field(default_factory=list)
    providers_used: list[str] = field(default_factory=list)
    placement: dict[str, int] = field(default_factory=dict)  # execution provider -> number of nodes
    fallback_nodes: list[str] = field(default_factory=list)  # nodes an accelerator EP left to the CPU
    optimization: str = "none"  # onnxscript's graph passes that ran: "full", "fold" or "none" (export_onnx)
    handoffs: list[str] = field(default_factory=list)  # "producer -> consumer" layers joined feature-major
    checked: bool = False
    max_abs_diff: float | None = None
    atol: float | None = None
    rtol: float | None = None
    checked_shapes: list[list[int]] = field(default_factory=list)  # first input's shape in each parity run
    unchecked: str | None = None  # what the parity check could not run, and why
    fixed_sizes: list[str] = field(default_factory=list)  # dynamic axes the example had at size 1, fixed at 1
    doubled_sizes: list[str] = field(default_factory=list)  # ... kept dynamic by capturing the example doubled
    inputs_added: dict[str, Any] = field(default_factory=dict)  # keyword inputs export_onnx set (use_cache=False)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each step, in the order they ran

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines."""
        ops = ", ".join(f"{k}×{v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        graph = {"full": "optimized", "fold": "constants folded"}.get(self.optimization, "not optimized")
        lines = [
            f"ONNX {self.path} ({self.dtype}, opset {self.opset}, {graph}): {sum(self.op_counts.values())} nodes: {ops}"
        ]
        if self.handoffs:
            lines.append(f"{len(self.handoffs)} layer outputs handed to the next layer feature-major, no token-order "
                         f"Gather: {', '.join(self.handoffs)}")
        if self.providers_used:
            placed = ", ".join(f"{k}: {v}" for k, v in self.placement.items())
            lines.append(f"providers {self.providers_used}; nodes per provider: {placed or 'n/a'}")
        if self.fallback_nodes:
            lines.append(f"WARNING: {len(self.fallback_nodes)} nodes fell back to CPU: {self.fallback_nodes[:10]}")
        if self.checked:
            shapes = ", ".join(str(tuple(shape)) for shape in self.checked_shapes)
            lines.append(
                f"parity with PyTorch: max |diff| = {self.max_abs_diff:.3g} (atol {self.atol:g}, rtol {self.rtol:g})"
                + (f" on inputs {shapes}" if shapes else "")
            )
        if self.unchecked:
            lines.append(f"WARNING: not checked: {self.unchecked}")
        if self.doubled_sizes:
            lines.append(
                f"captured from the example doubled along {', '.join(self.doubled_sizes)}, where it had size 1 "
                "(torch.export would have fixed that size), and checked at both sizes"
            )
        if self.inputs_added:
            added = ", ".join(f"{k}={v!r}" for k, v in self.inputs_added.items())
            lines.append(f"exported with {added} added to the example, so the graph holds no KV cache (pass "
                         "use_cache in example_kwargs to choose)")
        if self.fixed_sizes:
            lines.append(
                f"WARNING: takes only size 1 along {', '.join(self.fixed_sizes)}: torch.export fixed the size the "
                "example had there; export from an example of at least 2 along them to keep them dynamic (CLI: the "
                "example is the one the rewrite saved, from its factory or the model's config)"
            )
        if self.seconds:
            steps = ", ".join(f"{name} {t:.1f}" for name, t in self.seconds.items())
            lines.append(f"took {sum(self.seconds.values()):.1f} s: {steps}")
        return "\n".join(lines)


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Normalise ``"cpu"``/``"cuda"``/full names and check that ONNX Runtime has them.

    Raises:
        ExportError: a requested provider is not available in the installed onnxruntime.
    """
    import onnxruntime as ort

    if providers is None:
        providers = ["CPUExecutionProvider"]
    elif isinstance(providers, str):
        providers = [providers]
    names = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    if names[0] == "CUDAExecutionProvider" and "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    available = ort.get_available_providers()
    missing = [p for p in names if p not in available]
    if missing:
        hint = (
            "install einrewrite[gpu] (onnxruntime-gpu) instead of einrewrite[ort]; the two cannot live together"
            if "CUDAExecutionProvider" in missing
            else "check the provider name"
        )
        raise ExportError(f"execution provider(s) {missing} not available; onnxruntime has {available}: {hint}")
    return names


def onnxruntime_session(
    path: str | Path,
    providers: Sequence[str] | str | None = None,
    *,
    threads: int | None = None,
    stop_spinning: bool = False,
    flush_denormals: bool = False,
    profile_prefix: str | None = None,
) -> Any:
    """An ``InferenceSession`` with explicit providers and node-placement recording switched on.

    ``stop_spinning``: its worker threads stop spinning when a run ends (``session.force_spinning_stop``), for
    timing it in turn with other sessions or torch. Left spinning, they take a core from whatever runs next: on the
    2-core development machine, three d=1024 GPT sessions timed in turn at 64 tokens gave the third one 27.1 ms
    best of 200 rounds, and 10.3 ms with spinning stopped.

    ``flush_denormals``: denormal floats are flushed to zero on ORT's worker threads
    (``session.set_denormal_as_zero``) and, for the length of each ``session.run``, on the calling thread
    (:mod:`einrewrite.denormals`). A causal attention's masked ``Softmax`` then runs about 4x faster on the CPU:
    on the d=1024 benchmark GPT at 2048 tokens, three runs of both settings interleaved in one process (best of 10,
    20 and 40 rounds) gave its BTT export 13%, 2% and 10% faster, its dense export 4% faster, 2% slower and 2%
    faster; outputs unchanged.

    ``profile_prefix``: ORT profiles every run, into a JSON file named from it (``session.end_profiling()``).
    """
    import onnxruntime as ort

    names = resolve_providers(providers)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if stop_spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if flush_denormals:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=names)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"ONNX Runtime refused {path} with providers {names}: {e}") from e
    if flush_denormals:
        session.run = flushing_denormals(session.run)  # the calling thread runs part of every parallel loop
    return session


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_axes: bool = True,
    dtype: Literal["float32", "float16"] = "float32",
    check: bool = True,
    providers: Sequence[str] | str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    opset: int | None = None,
    moe_grouping: MoEGrouping = "auto",
    optimize: bool | None = None,
    custom_translation_table: Mapping[Any, Callable[..., Any]] | None = None,
) -> ExportReport:
    """Export ``model`` to ONNX with the torch dynamo exporter and check it.

    Args:
        model: any module, structured or not; it is copied, never modified.
        example_inputs: what ``model`` is run with, as for :func:`~einrewrite.rewrite`: a tensor, a tuple or list of
            positional inputs, a dict of keyword inputs (such as a tokenizer's output) or an
            :class:`~einrewrite.inputs.Inputs`. ``None``: a Hugging Face model's dummy inputs from its config
            (:func:`~einrewrite.default_example_inputs`).
        path: where to write the ``.onnx`` file (weights may go to ``path + ".data"``).
        example_kwargs: keyword inputs, added to those of ``example_inputs``. A model whose config caches keys and
            values (Hugging Face decoders) is exported with ``use_cache=False`` unless the inputs give
            ``use_cache`` (``report.inputs_added``).
        dynamic_axes: every axis of every input is dynamic except the feature (last) axis of float inputs,
            so batch and sequence length may change at run time. Where the example has size 1 on such an axis
            (a batch of one), torch.export would fix that size: the model is captured from the example doubled
            along it and checked in ONNX Runtime at both sizes (``report.doubled_sizes``), else captured with
            sizes of 1 kept dynamic and checked at size 2, else (and without ``check``) exported with that size
            fixed, which ``report.fixed_sizes`` lists.
        dtype: ``"float32"`` or ``"float16"`` (the model and its float inputs are cast).
        check: run the model in ONNX Runtime and compare with PyTorch (fp32: atol 1e-4; fp16: 2e-2).
        providers: execution providers for the check, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``
            or ``"cuda"``; default CPU.
        atol: override the parity tolerance.
        rtol: override the relative parity tolerance.
        opset: ONNX opset (default: the exporter's).
        moe_grouping: how BTT-MoE layers group tokens (:mod:`einrewrite.moe_lowering`): ``"set"`` by the set of
            experts a token picked (each input gathered once, each output written once; less activation
            traffic, more nodes: faster on wide layers and many tokens), ``"expert"`` by expert (fewer nodes:
            faster for narrow layers and decoding), ``"auto"`` (default) by expert on layers with
            ``d_in + 2·d_out < 3072`` and, on wider ones, an ``If`` on the token count that groups by set from
            1024 tokens on and by expert below.
        optimize: ``True``: run onnxscript's full graph optimizer (constant folding, rewrite rules, CSE) on the
            exported graph; ``False``: none of it. ``None`` (default): the full optimizer on graphs of at most
            :data:`OPTIMIZE_MAX_NODES` nodes (``If`` branches included), only its constant folding on larger ones.
            Its rewrite rules cost time quadratic in the node count (the d=1024 benchmark GPT with BTT-MoE layers,
            10656 nodes, most in branches: 60 s of export with them, 40-44 s with folding only, and the same speed
            in ONNX Runtime); the folding is what ONNX Runtime needs (it turns the exporter's ``SplitToSequence``
            into ``Split`` so ORT fuses attention), and ORT fuses the rest itself on load.
        custom_translation_table: ONNX translations (onnxscript functions) for ops the exporter does not know,
            keyed by ``OpOverload``, as for ``torch.onnx.export``. They add to einrewrite's own and to those of
            :func:`~einrewrite.external_ops.known_translations` (e.g. transformers' ``grouped_mm_fallback`` of
            fused MoE experts), and win over them.

    Returns:
        An :class:`ExportReport`; ``report.summary()`` prints it.

    Raises:
        ExportError: no example inputs and none to make, the exporter failed (the message names the op), the
            checker or ONNX Runtime rejected the model, or the outputs differ from PyTorch.
        ConfigError: ``example_inputs`` of none of the forms above.

    Examples:
        >>> import torch, einrewrite as er
        >>> layer = er.EinsumLinear(er.structure("btt", 64, 64, rank=2))
        >>> report = er.export_onnx(layer, (torch.randn(2, 8, 64),), "/tmp/btt.onnx")  # doctest: +SKIP
    """
    if dtype not in _TOLERANCES:
        raise ExportError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    check_grouping(moe_grouping)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = split_inputs(example_inputs)
    if inputs is None and not example_kwargs:
        inputs = default_example_inputs(model)
        if inputs is None:
            raise ExportError(
                f"{type(model).__name__}: no example inputs, and it is not a Hugging Face model with a config to "
                "make them from; pass example_inputs (a tensor, a tuple of positional inputs or a dict of keyword "
                "inputs)"
            )
    args = tuple(inputs.args) if inputs else ()
    kwargs = {**(inputs.kwargs if inputs else {}), **(example_kwargs or {})}
    # torch.export's shape guards fail on strided views (e.g. ids[:2, :8]): export with compact copies
    args, kwargs = tree_map(lambda t: t.contiguous() if isinstance(t, Tensor) else t, (args, kwargs))
    added = _without_kv_cache(model, args, kwargs)
    kwargs.update(added)
    names = resolve_providers(providers) if check else []
    work = copy.deepcopy(model).eval()
    if dtype == "float16":
        work = work.half()
        args, kwargs = _cast_floats((args, kwargs), torch.float16)
    dynamic = _dynamic_shapes(work, args, kwargs) if dynamic_axes else None
    unit = _unit_axes(work, args, kwargs) if dynamic_axes else []
    seconds: dict[str, float] = {}
    attempt = functools.partial(
        _export_once, work, path=path, dynamic=dynamic, opset=opset, optimize=optimize, dtype=dtype,
        moe_grouping=moe_grouping, translations=custom_translation_table, providers=names if check else None,
        tolerances=(atol, rtol), seconds=seconds,
    )
    if unit and check:  # keep the size-1 axes dynamic where ONNX Runtime shows that the graph runs them
        report = _export_with_unit_axes(attempt, work, args, kwargs, unit)
    else:  # no size-1 axis, or no ONNX Runtime to tell whether the graph still holds a 1: torch.export fixes them
        report = attempt(args, kwargs)
        report.fixed_sizes = unit
    report.inputs_added = added
    if report.fixed_sizes:
        log.warning("%s: sizes fixed at 1: %s", path, ", ".join(report.fixed_sizes))
    log.info("exported %s in %.1f s", path, sum(seconds.values()))  # the caller prints report.summary()
    return report


def _without_kv_cache(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"use_cache": False}`` for a model whose config caches keys and values by default (Hugging Face decoders)
    and whose forward takes ``use_cache``, unless the example gives it; else ``{}``. torch.export cannot return
    transformers' ``DynamicCache``, and an exported graph has no use for one built from the example."""
    if not getattr(getattr(model, "config", None), "use_cache", False):
        return {}
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or the example does not fit it: torch.export will say so
        return {}
    if "use_cache" in bound.arguments or "use_cache" not in bound.signature.parameters:
        return {}
    return {"use_cache": False}


def _export_with_unit_axes(
    attempt: Callable[..., ExportReport],
    work: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    unit: list[str],
) -> ExportReport:
    """Export from an example of size 1 along the dynamic axes ``unit`` so that they stay dynamic, trying in turn:

    1. the example doubled along them (:func:`_doubled`), captured as usual (torch.export fixes a size of 1, not
       of 2) and checked in ONNX Runtime at the doubled example and at the example itself
       (:func:`_check_example_itself`); skipped when PyTorch cannot run the doubled example;
    2. the example as given, captured with sizes of 1 kept dynamic and checked at size 2 as well
       (:func:`_check_unit_axes`): for graphs traced at size 2 that do not run at 1;
    3. the example as given with those sizes fixed at 1, listed in ``report.fixed_sizes``.

    ``attempt``: :func:`_export_once` with everything but the example bound.
    """
    big_args, big_kwargs = _doubled(args, kwargs)
    if _pytorch_runs(work, big_args, big_kwargs, f"the example doubled along {', '.join(unit)}"):
        try:
            report = attempt(big_args, big_kwargs, also_check=(args, kwargs))
        except ExportError as e:
            log.warning("from the example doubled along %s: %s; exporting again from the example itself with "
                        "those sizes kept dynamic", ", ".join(unit), _first_line(e))
        else:
            report.doubled_sizes = unit
            return report
    try:
        return attempt(args, kwargs, keep_unit_axes=True)
    except ExportError as e:  # mostly _UnitAxesError; else maybe the flag: never worse than without it
        why = e if isinstance(e, _UnitAxesError) else f"with the sizes of 1 kept dynamic: {_first_line(e)}"
        log.warning("%s; exporting again with those sizes fixed", why)
    report = attempt(args, kwargs)
    report.fixed_sizes = unit
    return report


def _pytorch_runs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> bool:
    """Whether ``model`` runs on an input (logged when not, as ``what``)."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # e.g. a model that only runs at size 1 along an axis
        log.info("PyTorch cannot run %s (%s)", what, _first_line(e))
        return False
    return True


def _doubled(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example with every tensor repeated twice along each of its dynamic axes (:func:`_dynamic_axes_of`) where
    it has size 1."""
    def grow(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        return t.repeat(*(2 if i in _dynamic_axes_of(t) and t.shape[i] == 1 else 1 for i in range(t.ndim)))

    return tree_map(grow, (args, kwargs))


def _export_once(
    work: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    path: Path,
    *,
    dynamic: Any,
    keep_unit_axes: bool = False,
    also_check: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    opset: int | None,
    optimize: bool | None,
    dtype: str,
    moe_grouping: MoEGrouping,
    translations: Mapping[Any, Callable[..., Any]] | None,
    providers: list[str] | None,
    tolerances: tuple[float | None, float | None],
    seconds: dict[str, float],
) -> ExportReport:
    """Capture, translate, optimize, save and (with ``providers``) check one export of :func:`export_onnx`.

    ``keep_unit_axes``: capture with torch.export's sizes of 1 kept dynamic, and check that ONNX Runtime runs
    them at size 2 (:class:`_UnitAxesError` if not).
    """
    import onnx

    # structured layers trace as MatMul chains with pre-arranged weights
    with onnx_lowering(work, moe_grouping), moe_lowering.numbered_branches():
        table = {**ONNX_TRANSLATIONS, **known_translations(), **(translations or {})}
        program = _run_exporter(work, args, kwargs, dynamic, opset, table, seconds, keep_unit_axes)
    with _step(seconds, "optimize", "optimizing the ONNX graph"):
        optimization = _optimize_graph(program, optimize)
        handoffs = _hand_off(program, optimize)
    with _step(seconds, "save", f"saving and checking {path}"):
        _drop_debug_metadata(program.model)
        program.save(str(path))
        try:
            onnx.checker.check_model(str(path))
        except Exception as e:  # onnx.checker.ValidationError and friends
            raise ExportError(f"onnx.checker rejected {path}: {e}") from e
        proto = onnx.load(str(path), load_external_data=False)
    report = ExportReport(
        path=str(path),
        dtype=dtype,
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        op_counts=dict(Counter(n.op_type for n in _all_nodes(proto))),
        einsum_nodes=[_node_label(n) for n in _all_nodes(proto) if n.op_type == "Einsum"],
        optimization=optimization,
        handoffs=handoffs,
        seconds=seconds,
    )
    structured_einsums = [n for n in report.einsum_nodes if any(c in n for c in _STRUCTURED_CLASSES)]
    if structured_einsums:
        raise ExportError(
            f"structured layers exported raw Einsum nodes {structured_einsums}; they must lower to MatMul chains "
            "(ONNX Runtime runs Einsum slowly and rejects it in bf16): this is an einrewrite bug, please report it"
        )
    if providers:
        default_atol, default_rtol = _TOLERANCES[dtype]
        atol, rtol = tolerances
        report.atol = default_atol if atol is None else atol
        report.rtol = default_rtol if rtol is None else rtol
        switched = [
            m for m in work.modules() if isinstance(m, BTTMoELinear) and chooses_by_token_count(m, moe_grouping)
        ]
        with _step(seconds, "check", f"running {path} in ONNX Runtime against PyTorch"):
            with _tokens_seen(switched) as tokens:  # counted in the parity check's PyTorch forward
                session = _check_with_onnxruntime(work, args, kwargs, report, providers)
            if also_check is not None:
                _check_example_itself(session, work, *also_check, report)
            if keep_unit_axes:
                _check_unit_axes(session, work, args, kwargs, report)
            if switched:
                _check_by_set_branch(session, work, args, kwargs, report, tokens)
    return report


def export_saved(
    out_dir: str | os.PathLike[str],
    path: str | Path,
    *,
    dtype: Literal["float32", "float16"] = "float32",
    providers: Sequence[str] | str | None = None,
    check: bool = True,
    overwrite: bool = False,
    moe_grouping: MoEGrouping = "auto",
    optimize: bool | None = None,
    atol: float | None = None,
    opset: int | None = None,
) -> ExportReport:
    """:func:`export_onnx` of the model saved in an einrewrite output directory (``einrewrite export``).

    The model is rebuilt with ``load_pretrained``; it is exported with the directory's example inputs (saved,
    or from the recorded factory), else dummy Hugging Face inputs from its config.

    Args:
        out_dir: a directory written by ``einrewrite rewrite -o`` / ``save_pretrained``.
        path: the ``.onnx`` file to write (weights may go to ``path + ".data"``).
        dtype: ``"float32"`` or ``"float16"``.
        providers: ONNX Runtime providers for the parity check (default CPU).
        check: run the parity check in ONNX Runtime.
        overwrite: replace an existing ``path`` (and its ``.data`` file).
        moe_grouping: how BTT-MoE layers group tokens (see :func:`export_onnx`).
        optimize: the exporter's graph optimizer (see :func:`export_onnx`; default: full on small graphs).
        atol: override the parity tolerance (default 1e-4 for float32, 2e-2 for float16).
        opset: ONNX opset (default: the exporter's).

    Raises:
        ExportError: ``path`` exists and ``overwrite`` is False, a provider is missing, no example inputs, or the
            export or its check failed. SavedModelError: not an einrewrite directory.

    Examples:
        >>> report = export_saved("out/tiny_gpt_btt", "out/tiny_gpt_btt.onnx")  # doctest: +SKIP
    """
    from .api import load_pretrained

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if not overwrite and (path.exists() or data.exists()):
        raise ExportError(f"{path}: exists; pass overwrite=True (CLI: --force) to replace it")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; give the path of the .onnx file to write")
    if check:
        resolve_providers(providers)  # fail before the (slow) load and export
    model = load_pretrained(out_dir).eval()
    inputs = split_inputs(getattr(model.einrewrite_report, "example_inputs", None)) or default_example_inputs(model)
    if inputs is None:
        raise ExportError(
            f"{out_dir}: no example inputs to export with (none saved, no factory inputs, not a Hugging Face "
            "model); call einrewrite.export_onnx(model, example_inputs, path) from Python"
        )
    for stale in (path, data):
        if overwrite and stale.is_file():
            stale.unlink()
    args, kwargs = inputs
    return export_onnx(model, tuple(args), path, example_kwargs=dict(kwargs), dtype=dtype, check=check,
                       providers=providers, moe_grouping=moe_grouping, optimize=optimize, atol=atol, opset=opset)


def _cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, tree)


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Dim.AUTO on every axis but the feature axis of float tensors; integer tensors (ids) fully dynamic."""
    auto = torch.export.Dim.AUTO

    def spec(value: Any) -> Any:
        if not isinstance(value, Tensor) or value.ndim == 0:
            return None
        return {i: auto for i in _dynamic_axes_of(value)}

    if not kwargs:
        return tuple(spec(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: tree_map(spec, value) for name, value in bound.arguments.items()}


def _named_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
    """The inputs under the names of ``model.forward``'s parameters, which torch.export gives the ONNX inputs
    (those passed through ``**kwargs`` under their keywords; ``"input 0"``, ``"input 1"`` ... for positional inputs
    when the signature cannot be bound)."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or one the example does not fit: torch.export will say so
        return [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    named: list[tuple[str, Any]] = []
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:  # **kwargs: each under its own name
            named += list(value.items())
        else:
            named.append((name, value))
    return named


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([^']+)'"),
    re.compile(r"No (?:ONNX function|decomposition) found for[^\w]*([\w.:]+)"),
    re.compile(r"\b(aten::\w+|aten\.\w+(?:\.\w+)?)"),
)


def _run_exporter(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic: Any,
    opset: int | None,
    translations: Mapping[Any, Callable[..., Any]],
    seconds: dict[str, float],
    keep_unit_axes: bool = False,
) -> Any:
    """torch.export first (to know which module owns a failing op), then the ONNX translation; their wall times go
    to ``seconds``. ``keep_unit_axes``: capture with :func:`_sizes_oblivious`."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), warnings_silenced():
        try:
            oblivious = _sizes_oblivious() if keep_unit_axes else contextlib.nullcontext()
            with _step(seconds, "capture", f"capturing {type(model).__name__} with torch.export"), oblivious:
                program = torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=dynamic, strict=False)
        except Exception as e:  # torch.export raises many types
            hint = (" A model that returns a KV cache exports with use_cache=False in example_kwargs."
                    if "Cache" in _first_line(e) else "")
            raise ExportError(
                f"torch.export could not capture {type(model).__name__}: {_first_line(e)}. The model must be "
                f"exportable (no data-dependent Python control flow); see torch.export's troubleshooting guide.{hint}"
            ) from e
        try:
            with _step(seconds, "translate", "translating the captured graph to ONNX"):
                return torch.onnx.export(
                    program,
                    dynamo=True,
                    opset_version=opset,
                    verbose=False,
                    custom_translation_table=dict(translations),
                    optimize=False,  # _optimize_graph decides
                )
        except Exception as e:  # the ONNX translation raises many types; name the op and its module
            text = _ANSI.sub("", f"{e}")
            op = next((m.group(1) for p in _OP_PATTERNS if (m := p.search(text))), None)
            where = f" at op {op}" if op else ""
            owner = _owner_of(program, op) if op else None
            if owner:
                where += f" in layer {owner!r}"
            raise ExportError(
                f"ONNX export of {type(model).__name__} failed{where}: {_first_line(e)}. Export the model before "
                "rewriting to see whether the failure is in the original model, exclude the layer that uses the "
                "op, or pass an onnxscript translation for it: export_onnx(..., custom_translation_table={op: fn})"
            ) from e


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _sizes_oblivious() -> Any:
    """A context in which torch.export keeps a dynamic axis dynamic when the example has size 0 or 1 along it.

    Otherwise an example batch of one sentence, or one token, would export a model that only takes that shape.
    torch.onnx.export sets the same flag when it captures a model itself (``backed_size_oblivious``); a torch
    without it gets a null context.
    """
    config = getattr(torch.fx.experimental, "_config", None)
    if config is None or not hasattr(config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return config.patch(backed_size_oblivious=True)


@contextlib.contextmanager
def _step(seconds: dict[str, float], name: str, what: str) -> Iterator[None]:
    """Log ``what`` (``einrewrite -v`` shows it) and add the wall time it takes to ``seconds[name]``, also when it
    raises."""
    log.info("%s", what)
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 3)  # a retry adds up


def _optimize_graph(program: Any, optimize: bool | None) -> str:
    """Run onnxscript's graph passes on ``program`` as ``optimize`` asks: ``"full"``, ``"fold"`` or ``"none"``.

    "full" is ``optimize_ir`` (folding, rewrite rules, CSE). ``ONNXProgram.optimize()`` then also runs onnxscript's
    ONNX fusions, which act on opset 23 only; they are left out: their ``RotaryEmbedding`` gives Llama's cos/sin
    caches a batch of 1, which the op does not allow and ONNX Runtime rejects when the model runs (ORT fuses
    rotary embeddings and RMS norms itself on load). Both modes leave the nodes over lowered weights unfolded
    (:func:`_fold_unless_lowered_weight`).
    """
    import onnxscript.optimizer

    if optimize is False:
        return "none"
    model = program.model
    nodes = sum(1 for _ in _ir_nodes(model))
    with warnings_silenced():
        if optimize or nodes <= OPTIMIZE_MAX_NODES:
            onnxscript.optimizer.optimize_ir(model, should_fold=_fold_unless_lowered_weight)
            return "full"
        log.info("%d nodes: only constant folding (optimize=True runs the full, slow optimizer)", nodes)
        onnxscript.optimizer.inline(model)
        onnxscript.optimizer.fold_constants(model, should_fold=_fold_unless_lowered_weight)
        onnxscript.optimizer.remove_unused_nodes(model)
    return "fold"


def _hand_off(program: Any, optimize: bool | None) -> list[str]:
    """:func:`einrewrite.handoff.hand_off_feature_major` on ``program`` unless ``optimize`` is False, then the
    nodes left unused (the skipped Gathers' shape arithmetic) removed."""
    import onnxscript.optimizer

    if optimize is False:
        return []
    handoffs = hand_off_feature_major(program.model)
    if handoffs:
        onnxscript.optimizer.remove_unused_nodes(program.model)
    return handoffs


def _ir_nodes(model: Any) -> Iterator[Any]:
    """Every node of ``model`` (an onnx_ir model): its graph's, its functions' and those in ``If`` branches, where a
    BTT-MoE layer exported under ``"auto"`` holds its groups (the d=1024 benchmark GPT: 496 nodes at the top,
    10656 in all)."""
    import onnx_ir

    for graph in (model.graph, *model.functions.values()):
        yield from onnx_ir.traversal.RecursiveGraphIterator(graph)


# Per-node Python stack traces and FX node texts the torch exporter writes: debugging aids that made up 28 of the
# 105 MiB of the benchmark GPT's BTT-MoE file and 65 MiB of its ONNX Runtime session. Each node keeps its module
# path (namespace, name scopes, class hierarchy).
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _drop_debug_metadata(model: Any) -> None:
    """Remove :data:`_DEBUG_METADATA` from every node of ``model`` (an onnx_ir model), branches of ``If`` included."""
    for node in _ir_nodes(model):
        for key in _DEBUG_METADATA:
            node.metadata_props.pop(key, None)


def _fold_unless_lowered_weight(node: Any) -> bool | None:
    """``should_fold`` for onnxscript: never fold a node that reads a lowered weight, else the default rules.

    Lowered weights are already in the layout their MatMuls read, and every one is read by MatMuls only. A node
    folded over one would store a rearranged copy next to it (a BTT-MoE layer whose sets stacked their experts'
    cores once wrote each expert 7 times for E=8, k=2); this keeps the file at one copy of each weight.
    """
    if any(value is not None and is_lowered_weight(value.name or "") for value in node.inputs):
        return False
    return None


def _first_line(error: BaseException) -> str:
    text = _ANSI.sub("", f"{error}").strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _owner_of(program: Any, op: str) -> str | None:
    """The FQN of the module whose forward called ``op`` in the exported program, if any."""
    wanted = op.replace("::", ".")
    for node in program.graph.nodes:
        if node.op == "call_function" and wanted in str(node.target).replace("::", "."):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                return str(list(stack.values())[-1][0]) or None
    return None


@contextlib.contextmanager
def warnings_silenced() -> Any:
    """Silence the exporter's chatty warnings and logs for the duration."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # onnx_ir warns on every empty attribute list an ATen translation writes (Mixtral's routing has some);
        # onnxscript's optimizer logs each graph input it does not fold, which would crowd out `einrewrite -v`
        loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
        previous = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        # torch.export warns of each axis it fixes at the example's size 1; the report names them (fixed_sizes)
        capture = logging.getLogger("torch._export.non_strict_utils")
        capture.addFilter(_drop_size_one_notes)
        try:
            yield
        finally:
            for logger, level in zip(loggers, previous, strict=True):
                logger.setLevel(level)
            capture.removeFilter(_drop_size_one_notes)


def _drop_size_one_notes(record: logging.LogRecord) -> bool:
    return "0/1 specialized" not in record.getMessage()


def _all_nodes(proto: Any) -> list[Any]:
    """Every node of the model: its graph's, its functions' and those of the branches of control-flow nodes (the
    ``If`` choosing a BTT-MoE layer's grouping by token count)."""
    graphs, nodes = [proto.graph, *proto.functions], []
    while graphs:
        for node in graphs.pop().node:
            nodes.append(node)
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.HasField("g") else attribute.graphs)
    return nodes


def _node_label(node: Any) -> str:
    scope = " ".join(p.value for p in node.metadata_props if "class_hierarchy" in p.key or "name_scopes" in p.key)
    return f"{node.name} {scope}".strip()


def _check_with_onnxruntime(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], report: ExportReport, providers: list[str]
) -> Any:
    """Run the export in ONNX Runtime on the example and compare with PyTorch; record it in ``report``. Returns
    the session."""
    session = onnxruntime_session(report.path, providers)
    report.providers_requested = providers
    report.providers_used = list(session.get_providers())
    if providers[0] not in report.providers_used:
        raise ExportError(
            f"ONNX Runtime did not start {providers[0]} for {report.path} (it uses {report.providers_used}); "
            "check the CUDA/cuDNN installation or choose --provider cpu"
        )
    _record_placement(session, report, providers[0])
    report.max_abs_diff = _compare(session, model, args, kwargs, report)
    report.checked = True
    return session


@contextlib.contextmanager
def _tokens_seen(layers: list[BTTMoELinear]) -> Iterator[list[int]]:
    """The token count of every call of ``layers`` while the context is open (forward pre-hooks)."""
    tokens: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, inp: tokens.append(inp[0].numel() // inp[0].shape[-1]))
             for layer in layers]
    try:
        yield tokens
    finally:
        for hook in hooks:
            hook.remove()


def _check_by_set_branch(
    session: Any,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    report: ExportReport,
    tokens: list[int],
) -> None:
    """Check again with the example's batch repeated until every BTT-MoE layer exported with ``"auto"`` grouping
    gets :data:`~einrewrite.moe_lowering.MIN_SET_TOKENS` tokens, so that the branch of their ``If`` that groups by
    expert set runs too; ``tokens``: those layers' token counts on the example (:func:`_tokens_seen`). A model that
    cannot run the larger batch is reported in ``report.unchecked``."""
    if not tokens or min(tokens) >= moe_lowering.MIN_SET_TOKENS:
        return  # the layers did not run, or the example already ran that branch
    times = math.ceil(moe_lowering.MIN_SET_TOKENS / max(1, min(tokens)))
    big_args, big_kwargs = tree_map(
        lambda t: t.repeat(times, *[1] * (t.dim() - 1)) if isinstance(t, Tensor) and t.dim() else t, (args, kwargs)
    )
    try:
        worst = _compare(session, model, big_args, big_kwargs, report)
    except Exception as e:
        if isinstance(e, ExportError) and not isinstance(e, _RunError):
            raise  # ORT ran and disagrees with PyTorch
        why = (e.__cause__ or e) if isinstance(e, _RunError) else e  # ORT or PyTorch cannot run the larger batch
        _note_unchecked(report, f"BTT-MoE grouping by expert set (the example repeated {times}x: {_first_line(why)})")
    else:
        report.max_abs_diff = max(report.max_abs_diff or 0.0, worst)


def _dynamic_axes_of(value: Tensor) -> range:
    """The axes :func:`_dynamic_shapes` marks dynamic: all of an integer tensor's, all but a float's last."""
    return range(value.ndim - 1) if value.is_floating_point() else range(value.ndim)


def _check_unit_axes(
    session: Any, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], report: ExportReport
) -> None:
    """Check again with every dynamic axis on which the example has size 1 doubled (each such input repeated along
    it): even with sizes of 1 kept dynamic, torch.export may leave a 1 in the graph (a view shaped from a size it
    guarded on), which the example alone cannot show. A model that PyTorch cannot run at size 2 is noted in
    ``report.unchecked``.

    Raises:
        _UnitAxesError: ONNX Runtime cannot run the doubled example, or disagrees with PyTorch on it.
    """
    big_args, big_kwargs = _doubled(args, kwargs)
    before, after = _feeds(session, args, kwargs), _feeds(session, big_args, big_kwargs)
    grown = [f"{name} {list(before[name].shape)} -> {list(after[name].shape)}"
             for name in before if before[name].shape != after[name].shape]
    if not grown:
        return
    try:
        worst = _compare_or_unit_error(session, model, big_args, big_kwargs, report, f"at size 2 ({', '.join(grown)})")
    except _UnitAxesError:
        raise
    except Exception as e:  # PyTorch itself cannot run the doubled example (a model with fixed sizes)
        _note_unchecked(report, f"the dynamic axes of size 1 at size 2 ({', '.join(grown)}: PyTorch: {_first_line(e)})")
    else:
        report.max_abs_diff = max(report.max_abs_diff or 0.0, worst)


def _check_example_itself(
    session: Any, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], report: ExportReport
) -> None:
    """Check a model captured from the example doubled (:func:`_export_with_unit_axes`) at the example itself: a
    graph traced at size 2 may assume a size is not 1 (a broadcast, a squeeze).

    Raises:
        _UnitAxesError: ONNX Runtime cannot run the example, or disagrees with PyTorch on it.
    """
    shapes = [list(a.shape) for a in _feeds(session, args, kwargs).values()]
    worst = _compare_or_unit_error(session, model, args, kwargs, report, f"at the example's sizes of 1 {shapes}")
    report.max_abs_diff = max(report.max_abs_diff or 0.0, worst)


def _compare_or_unit_error(
    session: Any, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], report: ExportReport, at: str
) -> float:
    """:func:`_compare` on an input the example's sizes of 1 were changed for (``at`` says how), with ONNX Runtime's
    own error log silenced: a failure there is expected, and answered by another capture.

    Raises:
        _UnitAxesError: ONNX Runtime cannot run the input, or disagrees with PyTorch on it.
    """
    try:
        return _compare(session, model, args, kwargs, report, quiet=True)
    except _RunError as e:
        raise _UnitAxesError(f"{report.path}: {at} ONNX Runtime fails{e.where}") from e
    except ExportError as e:  # ORT ran and disagrees with PyTorch
        raise _UnitAxesError(f"{report.path}: {at} the outputs differ ({e})") from e


def _note_unchecked(report: ExportReport, what: str) -> None:
    """Add ``what`` to the checks the report lists as not run, and log it."""
    report.unchecked = f"{report.unchecked}; {what}" if report.unchecked else what
    log.warning("%s: not checked: %s", report.path, what)


class _UnitAxesError(ExportError):
    """The export kept dynamic the axes its example had at size 1, and ONNX Runtime cannot run them at size 2."""


def _unit_axes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """The dynamic axes (:func:`_dynamic_axes_of`) of the example's tensors that have size 1, as ``"input_ids axis
    0"``, inputs named by :func:`_named_inputs` (``"past.1 axis 0"`` inside a tuple)."""
    found = []
    for name, value in _named_inputs(model, args, kwargs):
        leaves = tree_leaves(value)
        for j, t in enumerate(leaves):
            if isinstance(t, Tensor):
                label = name if len(leaves) == 1 else f"{name}.{j}"
                found += [f"{label} axis {i}" for i in _dynamic_axes_of(t) if t.shape[i] == 1]
    return found


def _compare(
    session: Any,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    report: ExportReport,
    quiet: bool = False,
) -> float:
    """Max |ORT - PyTorch| over the outputs on one input, recorded in ``report.checked_shapes`` (``quiet``: see
    :func:`_run`).

    Rows (axis 0) that differ only because they hold a near-tied BTT-MoE routing decision, which rounding may flip
    (:mod:`einrewrite.near_ties`), are left out of the check and of the max, and named in ``report.unchecked``,
    as long as another row holds.

    Raises:
        ExportError: the outputs differ beyond the report's tolerances, or do not match in number or shape.
    """
    feeds = _feeds(session, args, kwargs)
    with torch.no_grad(), recording_near_ties(model, getattr(torch, report.dtype)) as ties:
        expected = [t.detach().float().numpy() for t in tree_leaves(model(*args, **kwargs)) if isinstance(t, Tensor)]
    got = _run(session, feeds, report, quiet)
    shape = list(next(iter(feeds.values())).shape)
    report.checked_shapes.append(shape)
    if len(got) != len(expected):
        raise ExportError(f"ONNX model {report.path} has {len(got)} outputs but PyTorch returned {len(expected)}")
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        g = np.asarray(g, dtype=np.float32)
        if g.shape != e.shape:
            raise ExportError(f"ONNX output {i} of {report.path} has shape {g.shape}, PyTorch {e.shape}")
        diff = np.abs(g - e)
        assert report.atol is not None and report.rtol is not None
        mismatch = diff > report.atol + report.rtol * np.abs(e)
        if mismatch.any():
            rows = ties.excused(mismatch)
            if rows is None:
                raise ExportError(_parity_failure(report, i, diff, _verdict(model, args, kwargs, i, e, report)))
            if len(rows) == ties.batch:
                raise ExportError(_parity_failure(report, i, diff, _near_tie_verdict(ties, rows, shape, report.dtype)))
            _note_unchecked(report, _near_tie_note(ties, rows, shape, i, diff))
            diff = np.delete(diff, rows, axis=0)  # the rows that hold to the tolerance
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def _parity_failure(report: ExportReport, output: int, diff: np.ndarray, verdict: str) -> str:
    return (
        f"ONNX Runtime output {output} of {report.path} differs from PyTorch: max |diff| = {float(diff.max()):.3g} "
        f"> atol {report.atol:g} + rtol {report.rtol:g}·|expected| ({report.dtype}); {verdict}"
    )


def _verdict(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: int, expected: np.ndarray,
    report: ExportReport,
) -> str:
    """Why a parity check failed: the model's own sensitivity to rounding, or an unfaithful export."""
    assert report.atol is not None
    own = _float64_deviation(model, args, kwargs, output, expected)
    # float32: a tenth of atol already says the model amplifies rounding; float16 rounds some 1000x more
    # coarsely, so there PyTorch's own gap must exceed atol itself (e.g. BTT-MoE routing flipped by it)
    if own is not None and own > (report.atol / 10 if report.dtype == "float32" else report.atol):
        return (
            f"PyTorch's own {report.dtype} output differs from float64 by {own:.3g}, so the model is "
            "sensitive to rounding (e.g. large router logits, or near-tied BTT-MoE router scores that "
            "rounding flips to other experts) and the gap may be only that: if it is expected, pass a larger "
            "atol (CLI: --atol)"
        )
    return "the export is not faithful"


def _near_tie_verdict(ties: NearTies, rows: list[int], shape: list[int], dtype: str) -> str:
    return (
        f"it differs in every row of the input {shape}, and each holds a token whose BTT-MoE router scores are "
        f"near-tied (closest: {ties.closest(rows).describe()}), which rounding sends to other experts in ONNX "
        "Runtime than in PyTorch: this example cannot check the export; export from another example (more rows, "
        "other inputs)"
        + (", or check the float32 export, where rounding flips far fewer tokens" if dtype != "float32" else "")
    )


def _near_tie_note(ties: NearTies, rows: list[int], shape: list[int], output: int, diff: np.ndarray) -> str:
    return (
        f"rows {rows} of the input {shape} (output {output}: max |diff| {float(diff[rows].max()):.3g}), whose "
        f"BTT-MoE router scores are near-tied (closest: {ties.closest(rows).describe()}): rounding sent them to "
        "other experts in ONNX Runtime than in PyTorch; the other rows match"
    )


def _float64_deviation(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: int, expected: np.ndarray
) -> float | None:
    """Max |float32 - float64| of PyTorch output ``output``: the model's own rounding error (None if it cannot run)."""
    try:
        wide = copy.deepcopy(model).double()
        wide_args, wide_kwargs = _cast_floats((args, kwargs), torch.float64)
        with torch.no_grad():
            outs = [t for t in tree_leaves(wide(*wide_args, **wide_kwargs)) if isinstance(t, Tensor)]
        return float(np.abs(outs[output].detach().cpu().numpy() - expected).max())
    except Exception:  # a model that cannot run in float64 (custom kernels, device-only ops): no hint
        return None


class _RunError(ExportError):
    """ONNX Runtime loaded the exported model but could not run it on an input; ``where``: the failing node, as
    ``" at node 'name' in layer 'fqn'"`` (empty when ORT did not name it)."""

    where = ""


_ORT_NODE = re.compile(r"Name:'([^']+)'")  # how ONNX Runtime names the node that failed


def _run(session: Any, feeds: dict[str, np.ndarray], report: ExportReport, quiet: bool = False) -> list[Any]:
    """``session.run`` on ``feeds``; a failure becomes a :class:`_RunError` naming the node and its layer.
    ``quiet``: ONNX Runtime does not also log the failure (a run that is expected to fail)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if quiet:
        options.log_severity_level = 4  # fatal only
    try:
        return list(session.run(None, feeds, options))
    except Exception as e:  # onnxruntime raises its own InvalidArgument/Fail/RuntimeException types
        node = _ORT_NODE.search(f"{e}")
        where = f" at node {_located(report.path, node.group(1))}" if node else ""
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in feeds.items())
        error = _RunError(
            f"ONNX Runtime loaded {report.path} but could not run it{where} on {shapes}: {_first_line(e)}. The "
            "file is written; export with optimize=False (CLI: --no-optimize) in case a graph optimization made "
            "that node, or with another opset, and report the failure if it stays"
        )
        error.where = where
        raise error from e


def _located(path: str, name: str) -> str:
    """``'name'``, with ``in layer 'fqn'`` where the exporter recorded the module that made that node."""
    import ast

    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # the layer is a courtesy: the run error is reported either way
        return repr(name)
    scopes = node_module_scopes(proto).get(name, "[]")
    modules = [scope for scope in ast.literal_eval(scopes)[:-1] if scope]  # module FQNs, outermost first; then the op
    return f"{name!r} in layer {modules[-1]!r}" if modules else repr(name)


def node_module_scopes(proto: Any) -> dict[str, str]:
    """Each node's name -> the module path the exporter recorded for it (``pkg.torch.onnx.name_scopes``, the text
    of a list: the module FQNs, outermost first, then the op) in ``proto`` (an ``onnx.ModelProto``). A node
    in a branch of an ``If`` without one (those a translation records, such as a BTT-MoE layer's groupings) takes
    its ``If``'s: looked up here rather than copied into the file, where the copies cost the d=1024 benchmark GPT's
    BTT-MoE export 5.7 MiB and its ONNX Runtime session 22 MiB."""
    found: dict[str, str] = {}

    def walk(graph: Any, inherited: str) -> None:
        for node in graph.node:
            scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), inherited)
            found[node.name] = scopes
            for attribute in node.attribute:
                for branch in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                    walk(branch, scopes)

    for graph in (proto.graph, *proto.functions):
        walk(graph, "[]")
    return found


def _feeds(session: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    inputs = session.get_inputs()
    if len(inputs) != len(tensors):
        raise ExportError(f"the ONNX model takes {len(inputs)} inputs but {len(tensors)} example tensors were given")
    return {spec.name: t.detach().cpu().numpy() for spec, t in zip(inputs, tensors, strict=True)}


def _record_placement(session: Any, report: ExportReport, primary: str) -> None:
    try:
        assigned = session.get_provider_graph_assignment_info()
    except AttributeError:  # older onnxruntime: placement unknown
        return
    counts: Counter[str] = Counter()
    for subgraph in assigned:
        nodes = list(subgraph.get_nodes())
        counts[subgraph.ep_name] += len(nodes)
        if primary != "CPUExecutionProvider" and subgraph.ep_name == "CPUExecutionProvider":
            report.fallback_nodes.extend(f"{n.op_type}:{n.name}" for n in nodes)
    report.placement = dict(counts)
    if report.fallback_nodes:
        log.warning(
            "%d nodes fell back from %s to CPU: %s", len(report.fallback_nodes), primary, report.fallback_nodes[:10]
        )
