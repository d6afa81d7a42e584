"""The Python API: `rewrite`, `inspect_model`, `save_pretrained`, `load_pretrained` and `load_model`.

``rewrite`` runs :data:`einrewrite.passes.DEFAULT_PIPELINE` on a copy of the model (the input is untouched unless
``inplace=True``) and returns the structured model with a :class:`~einrewrite.report.RewriteReport`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget import LayerRequest, solve, solve_layer
from .config import ConfigError, RewriteConfig, structure_to_dict
from .errors import BudgetInfeasibleError, EinrewriteError, SavedModelError, StructureMismatchError
from .inputs import Inputs, default_example_inputs, split_inputs
from .passes import DEFAULT_PIPELINE, PassContext, find_targets, run_pipeline, trace_model
from .passes.replace_linear import apply_graph_plan
from .passes.swap_modules import dense_weight, set_submodule, structured_module
from .passes.trace import export_graph, find_linear_uses
from .passes.verify import run_model
from .report import Decision, RewriteReport, contraction_summary
from .spec import EinsumSpec
from .structures import STRUCTURES
from .tables import format_table
from .targets import Candidate, is_conv1d, is_structured

__all__ = [
    "Inputs",
    "Inspection",
    "LoadedModel",
    "ModelSourceError",
    "default_example_inputs",
    "inspect_model",
    "load_base_model",
    "load_model",
    "load_pretrained",
    "rewrite",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

META_FILE = "einrewrite.json"
WEIGHTS_FILE = "model.safetensors"
INPUTS_FILE = "example_inputs.safetensors"
_FORMAT_VERSION = 1
_MODES = ("auto", "module", "graph")


class ModelSourceError(ConfigError):
    """A MODEL argument is neither a Hugging Face directory, an einrewrite directory nor ``package.module:factory``."""


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- rewrite ---------------------------------------------------------------------------------------------
def rewrite(
    model: nn.Module,
    config: RewriteConfig | None = None,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    mode: str = "auto",
    verify: bool = True,
    progress: bool | None = None,
    pipeline: Sequence[Any] = DEFAULT_PIPELINE,
) -> tuple[nn.Module, RewriteReport]:
    """Replace the model's dense linear layers by structured layers sized to the config's FLOP budget.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        config: what to rewrite and how (default: ``RewriteConfig()``, BTT at 25% of each layer's MACs).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. Needed to trace linear
            ops on bare parameters (the graph path) and for the liveness check; Hugging Face models get dummy
            inputs from their config when omitted.
        inplace: modify ``model`` itself (module path only; the graph path always returns a new GraphModule).
        mode: ``"auto"`` (module swap; the graph path only when a targeted bare parameter is used as a linear
            weight), ``"module"`` (never trace) or ``"graph"`` (always export and rewrite the graph).
        verify: check output shapes/dtypes and that every replaced layer is on the forward path.
        progress: progress bar on stderr (None: on a terminal, for more than a few layers).
        pipeline: the passes to run (default :data:`einrewrite.passes.DEFAULT_PIPELINE`).

    Returns:
        ``(rewritten_model, report)``; the report is also attached as ``rewritten_model.einrewrite_report``.

    Raises:
        NoTargetsError: nothing to rewrite (the message lists what the model has and how to target it).
        BudgetInfeasibleError: a layer cannot meet the budget (the message names it and the least it needs).
        BypassedLayerError: a replaced layer is not on the forward path.
        TraceError: ``mode="graph"`` and the model cannot be exported.

    Examples:
        >>> import torch, einrewrite as er
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        >>> new, report = er.rewrite(mlp, er.RewriteConfig(structure="btt"), torch.randn(2, 64))
        >>> [d.status for d in report.decisions]
        ['replaced', 'replaced']
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    config = RewriteConfig() if config is None else config
    if not isinstance(config, RewriteConfig):
        raise ConfigError(f"config: expected an einrewrite.RewriteConfig, got {type(config).__name__}")
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {_MODES}, got {mode!r}")
    inputs = split_inputs(example_inputs)
    defaulted = inputs is None
    if defaulted:
        inputs = default_example_inputs(model)
    try:
        work = model if inplace else copy.deepcopy(model)
    except Exception as e:
        raise ConfigError(
            f"model ({type(model).__name__}): cannot be copied ({type(e).__name__}: {e}); pass inplace=True to "
            "rewrite it in place"
        ) from e
    params_before = _count_params(work)
    ctx = PassContext(config=config, mode=mode, progress=progress, verify=verify)
    if inputs is not None and (verify or not defaulted):
        try:
            ctx.reference = run_model(work, *inputs) if verify else None
            ctx.args, ctx.kwargs = inputs
        except Exception as e:
            if not defaulted:
                raise ConfigError(
                    f"example_inputs: the original model ({type(model).__name__}) fails on them: "
                    f"{type(e).__name__}: {e}"
                ) from e
            ctx.notes.append(
                f"the dummy inputs built from the model's config do not run it ({type(e).__name__}); pass "
                "example_inputs to trace bare parameters and check liveness"
            )
    elif inputs is not None:
        ctx.args, ctx.kwargs = inputs
    out = run_pipeline(work, ctx, pipeline)
    order = [c.fqn for c in ctx.candidates if c.fqn in ctx.decisions]
    report = RewriteReport(
        decisions=tuple(_with_path(ctx.decisions[f], ctx.plans.get(f)) for f in order),
        path=ctx.path if any(d.replaced for d in ctx.decisions.values()) else "none",
        config=config.to_dict(),
        noop=ctx.noop,
        notes=tuple(ctx.notes),
        verified=ctx.verified,
        output_error=ctx.output_error,
        model_params_before=params_before,
        model_params_after=_count_params(out),
        seconds=round(time.perf_counter() - start, 3),
        example_inputs=inputs,
    )
    report.base_class = _class_path(model)
    if out is not work and hasattr(model, "config"):
        out.config = model.config  # the GraphModule keeps the HF config for save_pretrained
    out.einrewrite_report = report
    logger.info("einrewrite: %s", report.summary().splitlines()[0])
    return out, report


def _with_path(decision: Decision, plan: Any) -> Decision:
    """The decision with its contraction path at :data:`REPORT_TOKENS` tokens (replaced layers only)."""
    if not decision.replaced or plan is None or decision.contraction is not None:
        return decision
    info = contraction_summary(getattr(plan, "spec", None))
    return decision if info is None else dataclasses.replace(decision, contraction=info)


def _class_path(model: nn.Module) -> str:
    base = getattr(getattr(model, "einrewrite_report", None), "base_class", None)
    if base is not None and isinstance(model, torch.fx.GraphModule):
        return base
    return f"{type(model).__module__}:{type(model).__qualname__}"


# ---- inspect ---------------------------------------------------------------------------------------------
@dataclass
class Inspection:
    """A dry run: every candidate layer, whether it is targeted, and what each structure would cost.

    Attributes:
        model: the model's class name.
        budget: the budget's text.
        layers: one dict per candidate: fqn, kind, d_in, d_out, params, macs, targeted, reason, detail.
        costs: structure -> fqn -> MACs/token chosen at the budget, or a short reason.
        totals: structure -> total MACs/token of the targeted layers at the budget (None when infeasible).
        notes: from tracing and targeting.
    """

    model: str
    budget: str
    layers: list[dict[str, Any]]
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    totals: dict[str, int | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The layers table, then the per-structure totals."""
        names = list(self.costs)
        rows = []
        for layer in self.layers:
            shape = "?" if layer["d_in"] is None else f"{layer['d_in']}->{layer['d_out']}"
            target = "yes" if layer["targeted"] else f"no: {layer['reason']}"
            cells = [_cost_text(self.costs[n].get(layer["fqn"]), layer["macs"]) for n in names]
            rows.append((layer["fqn"], layer["kind"], shape, f"{layer['params']:,}",
                         "-" if layer["macs"] is None else f"{layer['macs']:,}", target, *cells))
        header = ("layer", "kind", "shape", "params", "MACs/token", "targeted", *(f"{n} @ budget" for n in names))
        targeted = [la for la in self.layers if la["targeted"]]
        dense = sum(la["macs"] or 0 for la in targeted)
        lines = [format_table(header, rows), "", f"{self.model}: {len(self.layers)} candidate layers, "
                 f"{len(targeted)} targeted ({dense:,} dense MACs/token); budget: {self.budget}"]
        for name in names:
            total = self.totals.get(name)
            lines.append(
                f"  {name}: " + ("infeasible at this budget" if total is None else
                                 f"{total:,} MACs/token for the targeted layers ({total / dense:.1%} of dense)"
                                 if dense else f"{total:,}")
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"type": "Inspection", "version": 1, "data": dataclasses.asdict(self)}


def _cost_text(value: Any, dense: int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}" + (f" ({value / dense:.0%})" if dense else "")
    return str(value)


def inspect_model(
    model: nn.Module,
    config: RewriteConfig | None = None,
    example_inputs: Any = None,
    *,
    structures: Sequence[Any] | None = None,
    mode: str = "auto",
) -> Inspection:
    """What :func:`rewrite` would see: the candidate layers, the targeting decisions, and per-structure costs.

    Nothing is modified and nothing is projected. Bare parameters are resolved by tracing when example inputs
    are available (as in ``rewrite``).

    Args:
        model: the model.
        config: targeting and budget (default ``RewriteConfig()``).
        example_inputs: as for :func:`rewrite`.
        structures: the structures to cost (default: every registered structure with a search space, plus the
            config's structure).
        mode: as for :func:`rewrite`.
    """
    config = RewriteConfig() if config is None else config
    inputs = split_inputs(example_inputs) or default_example_inputs(model)
    ctx = PassContext(config=config, mode=mode, verify=False)
    if inputs is not None:
        ctx.args, ctx.kwargs = inputs
    find_targets(model, ctx)
    trace_model(model, ctx)
    layers = []
    targeted: list[Candidate] = []
    for cand in ctx.candidates:
        reason = ctx.rule_skips.get(cand.fqn)
        if reason is None and cand.d_in is None:
            reason = ("needs_example_inputs", "bare 2-D parameter: pass example inputs to trace it")
        if reason is None:
            targeted.append(cand)
        layers.append({
            "fqn": cand.fqn, "kind": "F.linear" if cand.kind == "param" else cand.kind, "d_in": cand.d_in,
            "d_out": cand.d_out, "params": cand.weight_numel, "macs": cand.dense_macs,
            "targeted": reason is None, "reason": None if reason is None else reason[0],
            "detail": None if reason is None else reason[1],
        })
    if structures is None:
        structures = [n for n in sorted(STRUCTURES) if n not in ("dense", "einsum")]
        if config.structure not in structures:
            structures = [config.structure, *structures]
    inspection = Inspection(type(model).__name__, config.budget.describe(), layers, notes=list(ctx.notes))
    for structure in structures:
        label = structure if isinstance(structure, str) else json.dumps(structure_to_dict(structure)["hyper"])
        costs: dict[str, Any] = {}
        requests = [LayerRequest(c.fqn, c.d_in, c.d_out, structure) for c in targeted]  # type: ignore[arg-type]
        total: int | None = 0
        if config.budget.is_global:
            try:
                for choice in solve(requests, config.budget):
                    costs[choice.fqn] = (
                        choice.spec.macs if choice.spec is not None else choice.skip[0]  # type: ignore[index]
                    )
            except (BudgetInfeasibleError, StructureMismatchError):
                costs = dict.fromkeys((r.fqn for r in requests), "infeasible")
        else:
            for req in requests:
                try:
                    choice = solve_layer(req, config.budget.ratio)  # type: ignore[arg-type]
                    costs[req.fqn] = (
                        choice.spec.macs if choice.spec is not None else choice.skip[0]  # type: ignore[index]
                    )
                except BudgetInfeasibleError:
                    costs[req.fqn] = "infeasible"
                except StructureMismatchError:
                    costs[req.fqn] = "no fit"
        for req in requests:
            value = costs.get(req.fqn)
            if value == "infeasible" or value == "no fit":
                total = None
            elif total is not None:
                total += value if isinstance(value, int) else req.dense_macs
        inspection.costs[label] = costs
        inspection.totals[label] = total
    return inspection


# ---- save / load -----------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    from . import __version__

    tf = sys.modules.get("transformers")
    return {"einrewrite": __version__, "torch": torch.__version__, "transformers": getattr(tf, "__version__", None)}


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    report: RewriteReport | None = None,
    *,
    overwrite: bool = False,
    factory: str | None = None,
) -> Path:
    """Write a rewritten model: ``model.safetensors``, ``einrewrite.json`` and, for HF models, ``config.json``.

    ``einrewrite.json`` holds the config, every per-layer decision (with the bound spec that reloading rebuilds),
    the base model's class and versions. The graph path also stores its example inputs, since reloading
    re-exports the base model.

    Args:
        model: the model :func:`rewrite` returned.
        out_dir: the directory to write.
        report: its report (default: ``model.einrewrite_report``).
        overwrite: replace an existing non-empty directory's files (CLI ``--force``).
        factory: ``package.module:factory`` that builds the base model, recorded so ``load_pretrained`` can
            rebuild it without ``base_model``.

    Raises:
        SavedModelError: ``out_dir`` is not empty and ``overwrite`` is False, or no report is available.
    """
    import safetensors.torch

    report = report if report is not None else getattr(model, "einrewrite_report", None)
    if not isinstance(report, RewriteReport):
        raise SavedModelError(
            f"{out_dir}: save_pretrained needs the RewriteReport of this model: pass report=... (the second value "
            "einrewrite.rewrite returns)"
        )
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise SavedModelError(f"{path}: exists and is a file; choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SavedModelError(
            f"{path}: directory exists and is not empty; pass overwrite=True (CLI: --force) to replace it"
        )
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path / WEIGHTS_FILE, lambda p: safetensors.torch.save_model(model, str(p)))
    hf_config = getattr(model, "config", None)
    if hf_config is not None and callable(getattr(hf_config, "to_json_file", None)):
        _atomic_write_bytes(path / "config.json", lambda p: hf_config.to_json_file(str(p)))
    inputs_meta = None
    if report.path == "graph":
        inputs_meta = _save_inputs(path, report.example_inputs)
    meta = {
        "format": "einrewrite",
        "format_version": _FORMAT_VERSION,
        "versions": _versions(),
        "base": {
            "class": report.base_class or _class_path(model),
            "hf_config": "config.json" if (path / "config.json").exists() and hf_config is not None else None,
            "factory": factory,
        },
        "weights": WEIGHTS_FILE,
        "example_inputs": inputs_meta,
        "config": report.config,
        "report": report.to_dict(),
    }
    text = json.dumps(meta, indent=2, default=str)
    # last: its presence marks a complete save
    _atomic_write_bytes(path / META_FILE, lambda p: p.write_text(text + "\n"))
    logger.info("einrewrite: saved %d replaced layers to %s", len(report.replaced), path)
    return path


def _save_inputs(path: Path, inputs: Inputs | None) -> dict[str, Any]:
    import safetensors.torch

    if inputs is None:
        raise SavedModelError(
            f"{path}: a graph-path model needs its example inputs to be saved; rewrite() keeps them in the report"
        )
    args, kwargs = inputs
    tensors: dict[str, torch.Tensor] = {}
    spec: dict[str, Any] = {"args": [], "kwargs": {}}
    for i, value in enumerate(args):
        spec["args"].append(_store(tensors, f"arg{i}", value, path))
    for key, value in kwargs.items():
        spec["kwargs"][key] = _store(tensors, f"kw.{key}", value, path)
    _atomic_write_bytes(
        path / INPUTS_FILE,
        lambda p: safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)),
    )
    return {"file": INPUTS_FILE, **spec}


def _store(tensors: dict[str, torch.Tensor], key: str, value: Any, path: Path) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu()
        return {"tensor": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise SavedModelError(
        f"{path}: example input {key!r} of type {type(value).__name__} cannot be saved; use tensors and plain values"
    )


def _load_inputs(path: Path, meta: dict[str, Any]) -> Inputs:
    import safetensors.torch

    file = path / meta["file"]
    if not file.is_file():
        raise SavedModelError(f"{path}: {meta['file']} is missing; the graph path needs it to re-export the base model")
    tensors = safetensors.torch.load_file(str(file))

    def get(entry: dict[str, Any]) -> Any:
        return tensors[entry["tensor"]] if "tensor" in entry else entry["value"]

    return Inputs(tuple(get(e) for e in meta["args"]), {k: get(e) for k, e in meta["kwargs"].items()})


def read_meta(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``einrewrite.json`` of a saved directory, checked for completeness.

    Raises:
        SavedModelError: missing directory, missing or corrupt ``einrewrite.json``, missing weights.
    """
    path = Path(out_dir)
    if not path.is_dir():
        raise SavedModelError(
            f"{path}: not a directory; give the directory einrewrite save_pretrained / rewrite -o wrote"
        )
    meta_path = path / META_FILE
    if not meta_path.is_file():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise SavedModelError(
            f"{path}: no {META_FILE} (found: {present}); this is not an einrewrite output directory, or its save did "
            "not finish: save it again"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SavedModelError(f"{meta_path}: corrupt JSON ({e}); save the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != "einrewrite":
        raise SavedModelError(f"{meta_path}: not an einrewrite metadata file (no \"format\": \"einrewrite\")")
    if meta.get("format_version") != _FORMAT_VERSION:
        raise SavedModelError(
            f"{meta_path}: format_version {meta.get('format_version')!r} is not supported (this einrewrite reads "
            f"{_FORMAT_VERSION})"
        )
    for key in ("report", "weights", "base"):
        if key not in meta:
            raise SavedModelError(f"{meta_path}: missing field {key!r}; save the model again")
    if not (path / meta["weights"]).is_file():
        raise SavedModelError(
            f"{path}: weights file {meta['weights']} is missing; the directory is partial: save it again"
        )
    return meta


def _spec_from_dict(fqn: str, data: dict[str, Any] | None) -> Any:
    """Rebuild a bound spec from its saved dict (``EinsumSpec``, or the spec class a structure provides)."""
    if not isinstance(data, dict):
        raise SavedModelError(f"{fqn}: the saved decision has no spec to rebuild the layer from")
    if data.get("name") == "btt_moe":  # the MoE spec lives beside its structure
        for module_name in ("einrewrite.structures.btt_moe", "einrewrite.moe"):
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for attr in vars(module).values():
                if (
                    isinstance(attr, type)
                    and attr.__module__ == module.__name__
                    and attr.__name__.endswith("Spec")
                    and callable(getattr(attr, "from_dict", None))
                ):
                    return attr.from_dict(data)
    try:
        return EinsumSpec.from_dict(data)
    except EinrewriteError as e:
        raise SavedModelError(f"{fqn}: cannot rebuild its spec from the saved dict: {e}") from None


def _build_base(path: Path, meta: dict[str, Any]) -> tuple[nn.Module, Inputs | None]:
    base = meta["base"]
    if base.get("factory"):
        model, inputs = _call_factory(base["factory"])
        return model, split_inputs(inputs)
    if base.get("hf_config"):
        return _build_hf(path, base.get("class"), weights=False), None
    raise SavedModelError(
        f"{path}: cannot rebuild the base model ({base.get('class')}): it is neither a Hugging Face model nor from "
        "a factory; pass base_model=<the model einrewrite rewrote> to load_pretrained"
    )


def load_pretrained(
    out_dir: str | os.PathLike[str], base_model: nn.Module | None = None, *, inplace: bool = False
) -> nn.Module:
    """Rebuild a model written by :func:`save_pretrained` and load its weights.

    Args:
        out_dir: the directory.
        base_model: the model that was rewritten (same architecture; its weights do not matter). When omitted,
            Hugging Face models are rebuilt from the ``config.json`` saved beside the weights (offline, random
            init before loading), and factory models by calling the recorded factory.
        inplace: modify ``base_model`` itself instead of a copy.

    Returns:
        The rewritten model (``einrewrite_report`` attached); a ``GraphModule`` for graph-path saves.

    Raises:
        SavedModelError: bad or partial directory, or a base model that does not match the saved decisions.
    """
    import safetensors.torch

    path = Path(out_dir)
    meta = read_meta(path)
    report = RewriteReport.from_dict(meta["report"])
    report.base_class = meta["base"].get("class")
    if base_model is not None:
        model = base_model if inplace else copy.deepcopy(base_model)
    else:
        model, report.example_inputs = _build_base(path, meta)
    if report.path == "graph":
        if not meta.get("example_inputs"):
            raise SavedModelError(f"{path}: graph-path save without example inputs in {META_FILE}; save it again")
        inputs = _load_inputs(path, meta["example_inputs"])
        report.example_inputs = inputs
        config = model.config if hasattr(model, "config") else None
        model = _apply_graph(model, report, inputs, path)
        if config is not None:
            model.config = config
    else:
        _apply_modules(model, report, path)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path / meta["weights"]), strict=False)
    except (RuntimeError, ValueError, OSError) as e:
        raise SavedModelError(
            f"{path}: the weights do not fit the rebuilt model: {str(e).splitlines()[0][:400]}"
        ) from None
    if missing or unexpected:
        raise SavedModelError(
            f"{path}: the weights do not match the rebuilt model (missing: {sorted(missing)[:5]}, unexpected: "
            f"{sorted(unexpected)[:5]}); pass the base model the directory was made from"
        )
    model.einrewrite_report = report
    return model


def load_base_model(out_dir: str | os.PathLike[str]) -> LoadedModel:
    """The dense model an einrewrite directory was made from, rebuilt as :func:`load_pretrained` does.

    The base is built from the recorded factory, or from the ``config.json`` saved beside the weights (Hugging
    Face; random init), and is left dense: use it as the reference when timing or exporting the rewrite.

    Args:
        out_dir: a directory written by :func:`save_pretrained` (``einrewrite rewrite -o``).

    Returns:
        A :class:`LoadedModel` with the dense model and the example inputs the factory gave or the directory
        stored (None for a Hugging Face model: use :func:`default_example_inputs`).

    Raises:
        SavedModelError: bad or partial directory, or a base model that cannot be rebuilt.

    Examples:
        >>> base = load_base_model("out/tiny_gpt_btt")  # doctest: +SKIP
    """
    path = Path(out_dir)
    meta = read_meta(path)
    model, inputs = _build_base(path, meta)
    if inputs is None and meta.get("example_inputs"):
        inputs = _load_inputs(path, meta["example_inputs"])
    factory = meta["base"].get("factory")
    return LoadedModel(model.eval(), inputs, "factory" if factory else "hf", factory)


def _apply_modules(model: nn.Module, report: RewriteReport, path: Path) -> None:
    """Rebuild every layer that was structured when saved: replaced now, or already structured before."""
    for d in report.decisions:
        if not (d.replaced or d.reason == "already_structured"):
            continue
        try:
            module = model.get_submodule(d.fqn)
        except AttributeError:
            raise SavedModelError(
                f"{d.fqn}: saved as a structured layer but the base model has no such module; pass the base model the "
                f"directory {path} was made from"
            ) from None
        spec = _spec_from_dict(d.fqn, d.spec)
        if is_structured(module):
            if d.replaced or module.spec != spec:
                raise SavedModelError(
                    f"{d.fqn}: the base model already has a structured layer here; pass the original (dense) model, "
                    "not a rewritten one"
                )
            continue
        kinds = ("Linear", "Conv1D") if d.kind == "structured" else (d.kind,)
        kind = "Linear" if isinstance(module, nn.Linear) else "Conv1D" if is_conv1d(module) else type(module).__name__
        weight = dense_weight(module, kind) if kind in kinds else None
        if weight is None or tuple(weight.shape) != (d.d_out, d.d_in):
            found = kind + ("" if weight is None else f" {weight.shape[1]}->{weight.shape[0]}")
            raise SavedModelError(
                f"{d.fqn}: saved as a {'/'.join(kinds)} {d.d_in}->{d.d_out} but the base model has {found}; pass the "
                f"base model the directory {path} was made from"
            )
        new = structured_module(spec, weight, getattr(module, "bias", None), init="mup", like=module)
        set_submodule(model, d.fqn, new)


def _apply_graph(model: nn.Module, report: RewriteReport, inputs: Inputs, path: Path) -> nn.Module:
    gm = export_graph(model, *inputs)
    info = find_linear_uses(gm)
    for d in report.replaced:
        wfqn = d.weight_fqn or f"{d.fqn}.weight"
        if not info.uses.get(wfqn):
            raise SavedModelError(
                f"{d.fqn}: saved as a graph-path layer on {wfqn}, but the re-exported base model has no linear op on "
                f"that parameter; pass the base model the directory {path} was made from"
            )
        module_fqn, _, pname = wfqn.rpartition(".")
        kind = "param" if d.kind == "F.linear" else d.kind
        cand = Candidate(d.fqn, kind, gm, module_fqn, pname, d.d_in, d.d_out, d.has_bias, (d.fqn,), d.kind)
        apply_graph_plan(gm, info, cand, _spec_from_dict(d.fqn, d.spec), init="mup")
    gm.graph.lint()
    gm.recompile()
    return gm


# ---- resolving a MODEL argument --------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model resolved from a MODEL string, with what is known about where it came from.

    Attributes:
        model: the module.
        example_inputs: inputs the factory provided (or None).
        source: ``"hf"``, ``"factory"`` or ``"einrewrite"``.
        factory: the ``package.module:factory`` string for factory models (recorded by save).
    """

    model: nn.Module
    example_inputs: Any = None
    source: str = "hf"
    factory: str | None = None


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _build_hf(path: Path, class_path: str | None, *, weights: bool) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(
            f"{path}: a Hugging Face model directory needs transformers: pip install transformers"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ModelSourceError(f"{path}: config.json cannot be read by transformers: {type(e).__name__}: {e}") from None
    cls = None
    if class_path and ":" in class_path:
        module_name, _, qual = class_path.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), qual)
        except (ImportError, AttributeError):
            cls = None
    if cls is None:
        for arch in getattr(config, "architectures", None) or ():
            cls = getattr(transformers, arch, None)
            if cls is not None:
                break
    if weights and any((path / f).exists() for f in _HF_WEIGHTS):
        loader = cls or transformers.AutoModel
        return loader.from_pretrained(str(path), local_files_only=True)
    if weights:
        logger.warning("%s: no weights next to config.json; the model is randomly initialised", path)
    model = transformers.AutoModel.from_config(config) if cls is None else cls(config)
    return model.eval()  # as from_pretrained does


def _call_factory(spec: str) -> tuple[nn.Module, Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSourceError(f"{spec}: expected package.module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path:  # like `python -m`, resolve modules from the working directory
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSourceError(f"{spec}: cannot import {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ModelSourceError(f"{spec}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ModelSourceError(f"{spec}: {attr!r} is not callable")
    try:
        result = fn()
    except EinrewriteError:
        raise
    except Exception as e:
        raise EinrewriteError(f"{spec}: the factory raised {type(e).__name__}: {e}") from e
    model, inputs = (result if isinstance(result, tuple) and len(result) == 2 else (result, None))
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"{spec}: the factory must return an nn.Module or (module, example_inputs), got {type(result).__name__}"
        )
    return model, inputs


def load_model(source: str | os.PathLike[str]) -> LoadedModel:
    """Resolve a MODEL argument: an einrewrite output directory, a Hugging Face directory or a factory.

    * a directory with ``einrewrite.json``: :func:`load_pretrained`;
    * a directory with ``config.json``: the Hugging Face model, built offline (weights loaded when present,
      random init otherwise; never downloaded);
    * ``package.module:factory``: the callable's result, an ``nn.Module`` or ``(module, example_inputs)``; the
      working directory is importable.

    Raises:
        ModelSourceError: none of the above.
    """
    text = str(source)
    path = Path(text)
    if path.is_dir():
        if (path / META_FILE).is_file():
            meta = read_meta(path)
            model = load_pretrained(path)
            return LoadedModel(model, model.einrewrite_report.example_inputs, "einrewrite", meta["base"].get("factory"))
        if (path / "config.json").is_file():
            return LoadedModel(_build_hf(path, None, weights=True), None, "hf")
        raise ModelSourceError(
            f"{path}: a directory without config.json (Hugging Face) or {META_FILE} (einrewrite output); give one of "
            "those, or package.module:factory"
        )
    if ":" in text and not path.exists():
        model, inputs = _call_factory(text)
        return LoadedModel(model, inputs, "factory", text)
    raise ModelSourceError(
        f"{text}: not found; MODEL is a Hugging Face model directory (config.json), an einrewrite output directory "
        f"({META_FILE}) or package.module:factory"
    )
