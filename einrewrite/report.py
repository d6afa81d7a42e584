"""The rewrite report: one `Decision` per candidate layer, totals, a table for people and JSON for machines."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SavedModelError
from .tables import format_table

__all__ = ["REPORT_TOKENS", "Decision", "RewriteReport", "contraction_summary"]

_REPORT_VERSION = 1
REPORT_TOKENS = 2048  # the token count at which the report prices each layer's contraction path


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What happened to one candidate layer.

    Attributes:
        fqn: the layer's fully-qualified name (a parameter's FQN for a bare ``F.linear`` weight).
        kind: ``Linear``, ``Conv1D``, ``F.linear`` (a linear op on a bare parameter), ``structured`` or ``experts``.
        status: ``"replaced"`` or ``"skipped"``.
        reason: the skip code (see :data:`einrewrite.targets.REASONS`); None when replaced.
        detail: what a person reads: why it was skipped, or how it was found.
        path: ``"module"`` (module swap) or ``"graph"`` (torch.export node surgery); None when skipped.
        d_in: input features (None when unknown).
        d_out: output features.
        has_bias: whether the layer adds a bias.
        structure: the structure's registry name when replaced.
        hyper: the structure's hyper-parameters when replaced.
        spec: ``spec.to_dict()`` of the bound structure (what reloading rebuilds from).
        params_before: weight parameters of the dense layer (bias excluded).
        params_after: weight parameters after (equal to before when skipped).
        macs_before: MACs per token of the dense layer (None when unknown).
        macs_after: MACs per token after.
        budget_macs: the MACs per token the layer was allowed (per-layer) or allocated (global budget).
        projection_error: ``‖W - Ŵ‖_F / ‖W‖_F`` of the projected weight (None with µP init or when skipped).
        weight_fqn: FQN of the dense weight this layer was built from.
        weight_layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (Conv1D, ``x @ w``) of that weight.
        contraction: the contraction path chosen for the layer at ``contraction["tokens"]`` tokens (see
            :func:`contraction_summary`): kind, order, steps, FLOPs per token, the priced cost, and the ONNX
            lowering; None when skipped, or in reports written before it existed.
    """

    fqn: str
    kind: str
    status: str
    reason: str | None = None
    detail: str = ""
    path: str | None = None
    d_in: int | None = None
    d_out: int | None = None
    has_bias: bool = False
    structure: str | None = None
    hyper: dict[str, Any] | None = None
    spec: dict[str, Any] | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    budget_macs: int | None = None
    projection_error: float | None = None
    weight_fqn: str | None = None
    weight_layout: str | None = None
    contraction: dict[str, Any] | None = None

    @property
    def replaced(self) -> bool:
        """True when the layer was rewritten."""
        return self.status == "replaced"

    @property
    def shape(self) -> str:
        """``d_in->d_out`` text."""
        return "?" if self.d_in is None or self.d_out is None else f"{self.d_in}->{self.d_out}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise SavedModelError(f"report: unknown decision fields {sorted(unknown)} in {dict(data)!r}")
        return cls(**dict(data))


def contraction_summary(spec: Any, tokens: int = REPORT_TOKENS) -> dict[str, Any] | None:
    """How a structured layer of ``spec`` contracts at ``tokens`` tokens: what the report shows as its path.

    Returns ``{"tokens", "kind", "order", "steps", "flops_per_token", "cost", "plan", "optimal", "onnx"}``:
    ``kind``/``order``/``steps`` are :func:`einrewrite.contraction.plan_contraction`'s choice (the eager
    forward, cached per token bucket), ``flops_per_token`` its forward FLOPs per token, ``cost`` its priced
    cost of one call (FLOPs plus data movement in FLOP equivalents), ``plan`` a one-line description,
    ``optimal`` opt_einsum's unrestricted path, and ``onnx`` the MatMul chain the exporter emits. None for
    a spec that is not an :class:`~einrewrite.spec.EinsumSpec` or is dense.

    Examples:
        >>> from einrewrite import structure
        >>> info = contraction_summary(structure("monarch", 1024, 1024))
        >>> info["kind"], info["order"], info["flops_per_token"], info["tokens"]
        ('bmm', 'xA', 131072, 2048)
    """
    from .contraction import plan_contraction
    from .lowering import lowering_plan
    from .spec import EinsumSpec

    expert = getattr(spec, "expert", None)
    if isinstance(expert, EinsumSpec) and hasattr(spec, "top_k") and hasattr(spec, "num_experts"):
        return _moe_summary(spec, expert, tokens)
    if not isinstance(spec, EinsumSpec) or spec.is_dense:
        return None
    plan = plan_contraction(spec, tokens)
    return {
        "tokens": tokens,
        "kind": plan.kind,
        "order": plan.order,
        "steps": list(plan.steps),
        "flops_per_token": plan.cost,
        "cost": plan.total_cost,
        "plan": plan.describe(),
        "optimal": plan.optimal,
        "onnx": lowering_plan(spec).describe(),
    }


def _moe_summary(spec: Any, expert: Any, tokens: int) -> dict[str, Any]:
    """BTT-MoE: the router, then each expert's rank-1 BTT on the ~k/E share of tokens routed to it."""
    from .contraction import plan_contraction

    per_expert = max(1, tokens * spec.top_k // spec.num_experts)
    plan = plan_contraction(expert, per_expert)
    flops = 2 * int(spec.macs)  # router + k experts, per token
    return {
        "tokens": tokens,
        "kind": f"moe top{spec.top_k}/{spec.num_experts}",
        "order": plan.order,
        "steps": list(plan.steps),
        "flops_per_token": flops,
        "cost": tokens * flops,
        "plan": f"router, then per expert on ~{per_expert} tokens: {plan.describe()}",
        "optimal": plan.optimal,
        "onnx": "sparse: NonZero and Gather per expert, two MatMul each, Gather back to token order, k slots added",
    }


def _path_text(info: dict[str, Any] | None) -> str:
    """The table's short form of a contraction summary: ``bmm xA 98.3k FLOPs/tok``."""
    if not info:
        return "-"
    return f"{info.get('kind', '?')} {info.get('order', '?')} {_num(info.get('flops_per_token'))} FLOPs/tok"


def _num(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _pct(after: int | None, before: int | None) -> str:
    if after is None or not before:
        return ""
    return f" ({after / before:.1%})"


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _collapse_indices(names: Sequence[str]) -> str:
    """``h.0.attn``, ``h.1.attn`` -> ``h.{0..1}.attn`` (numbers at the same position merged into ranges)."""
    if len(names) == 1:
        return names[0]
    template = _INDEX.sub("#", names[0])
    columns: list[list[int]] = [[] for _ in range(template.count("#"))]
    for name in names:
        for i, m in enumerate(_INDEX.findall(name)):
            columns[i].append(int(m))
    parts = template.split("#")
    out = parts[0]
    for i, col in enumerate(columns):
        values = sorted(set(col))
        if len(values) == 1:
            text = str(values[0])
        elif values == list(range(values[0], values[-1] + 1)):
            text = f"{{{values[0]}..{values[-1]}}}"
        else:
            text = "{" + ",".join(map(str, values)) + "}"
        out += text + parts[i + 1]
    return out


@dataclass
class RewriteReport:
    """Every decision of one rewrite, with totals; ``table()`` for people and ``to_dict()`` for machines.

    Attributes:
        decisions: one :class:`Decision` per candidate layer, in model order.
        path: ``"module"`` (eager module swap; the model stays an ``nn.Module``), ``"graph"`` (torch.export; the
            result is an FX ``GraphModule``) or ``"none"`` (nothing replaced).
        config: the ``RewriteConfig.to_dict()`` used.
        noop: True when the model was already rewritten and nothing was left to do.
        notes: things a user should know (liveness not checked, export problems, unmatched excludes, ...).
        verified: True when every replaced layer was shown to be on the forward path; None when not checked.
        output_error: max |y_rewritten - y_dense| / max |y_dense| on the example inputs (None when not checked).
        model_params_before: parameters of the model before (tied tensors counted once).
        model_params_after: parameters after.
        seconds: wall time of the rewrite.
    """

    decisions: tuple[Decision, ...]
    path: str = "module"
    config: dict[str, Any] | None = None
    noop: bool = False
    notes: tuple[str, ...] = ()
    verified: bool | None = None
    output_error: float | None = None
    model_params_before: int | None = None
    model_params_after: int | None = None
    seconds: float | None = None
    example_inputs: Any = field(default=None, repr=False, compare=False)  # kept for save (graph path); not JSON
    base_class: str | None = field(default=None, compare=False)  # "module:qualname" of the model rewritten

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def replaced(self) -> list[Decision]:
        """Decisions of the rewritten layers."""
        return [d for d in self.decisions if d.replaced]

    @property
    def skipped(self) -> list[Decision]:
        """Decisions of the layers left as they were."""
        return [d for d in self.decisions if not d.replaced]

    def __getitem__(self, fqn: str) -> Decision:
        for d in self.decisions:
            if d.fqn == fqn:
                return d
        raise KeyError(f"{fqn!r} is not a layer of this report; layers: {', '.join(d.fqn for d in self.decisions)}")

    def totals(self) -> dict[str, Any]:
        """Counts and sums over the candidate layers (layers with unknown MACs are left out of the MAC sums)."""
        linear = [d for d in self.decisions if d.macs_before is not None]
        macs_before = sum(d.macs_before or 0 for d in linear)
        macs_after = sum(d.macs_after or 0 for d in linear)
        rep = self.replaced
        return {
            "layers": len(self.decisions),
            "replaced": len(rep),
            "skipped": len(self.decisions) - len(rep),
            "skipped_by_reason": dict(Counter(d.reason for d in self.skipped)),
            "linear_params_before": sum(d.params_before for d in linear),
            "linear_params_after": sum(d.params_after for d in linear),
            "linear_macs_before": macs_before,
            "linear_macs_after": macs_after,
            "replaced_macs_before": sum(d.macs_before or 0 for d in rep),
            "replaced_macs_after": sum(d.macs_after or 0 for d in rep),
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "max_projection_error": max(
                (d.projection_error for d in rep if d.projection_error is not None), default=None
            ),
        }

    def summary(self) -> str:
        """A few lines: counts, parameters and MACs before and after, notes."""
        t = self.totals()
        lines = []
        if self.noop:
            lines.append(
                "nothing to do: the model is already rewritten "
                f"({t['skipped_by_reason'].get('already_structured', 0)} structured layers)"
            )
        via = f" via the {self.path} path" if t["replaced"] else ""
        lines.append(
            f"replaced {t['replaced']} of {t['layers']} candidate layers{via}"
            + (
                f"; skipped: {', '.join(f'{k} x{v}' for k, v in sorted(t['skipped_by_reason'].items()))}"
                if t["skipped"]
                else ""
            )
        )
        lines.append(
            f"linear layers: params {_num(t['linear_params_before'])} -> {_num(t['linear_params_after'])}"
            f"{_pct(t['linear_params_after'], t['linear_params_before'])}, MACs/token {_num(t['linear_macs_before'])}"
            f" -> {_num(t['linear_macs_after'])}{_pct(t['linear_macs_after'], t['linear_macs_before'])}"
        )
        if self.model_params_before is not None and self.model_params_after is not None:
            lines.append(
                f"model params {_num(self.model_params_before)} -> {_num(self.model_params_after)}"
                f"{_pct(self.model_params_after, self.model_params_before)}"
            )
        checks = []
        if self.verified is True:
            checks.append("every replaced layer is on the forward path")
        if self.output_error is not None:
            checks.append(f"output deviation {self.output_error:.3g} (relative to max |y|)")
        if checks:
            lines.append("checked: " + "; ".join(checks))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def table(self, *, collapse: bool = True) -> str:
        """The per-layer table followed by :meth:`summary`.

        Args:
            collapse: merge layers that differ only by their numeric indices and share the same decision
                (``h.{0..11}.attn.c_attn``), as transformers' loading reports do.
        """
        groups: dict[tuple[Any, ...], list[Decision]] = {}
        for d in self.decisions:
            key: tuple[Any, ...] = (d.fqn,)
            if collapse:
                hyper = json.dumps(d.hyper, sort_keys=True, default=str)
                key = (_INDEX.sub("#", d.fqn), d.kind, d.status, d.reason, d.shape, d.structure, hyper, d.path)
            groups.setdefault(key, []).append(d)
        rows = []
        for members in groups.values():
            d = members[0]
            errors = [m.projection_error for m in members if m.projection_error is not None]
            if d.replaced:
                hyper = ", ".join(f"{k}={_short(v)}" for k, v in (d.hyper or {}).items())
                what = f"{d.structure}({hyper})"
                note = f"via {d.path}"
            else:
                what = f"skipped: {d.reason}"
                note = d.detail
            rows.append(
                (
                    _collapse_indices([m.fqn for m in members]),
                    f"x{len(members)}" if len(members) > 1 else "",
                    d.kind,
                    d.shape,
                    what,
                    f"{_num(d.params_before)} -> {_num(d.params_after)}",
                    f"{_num(d.macs_before)} -> {_num(d.macs_after)}"
                    f"{_pct(d.macs_after, d.macs_before) if d.replaced else ''}",
                    f"{max(errors):.3f}" if errors else "-",
                    _path_text(d.contraction) if d.replaced else "-",
                    note,
                )
            )
        tokens = next((d.contraction["tokens"] for d in self.decisions if d.contraction), REPORT_TOKENS)
        header = ("layer", "n", "kind", "shape", "decision", "params", "MACs/token", "proj. err",
                  f"path @ {tokens} tok", "note")
        return format_table(header, rows) + "\n\n" + self.summary()

    def __str__(self) -> str:
        return self.table()

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"type": "RewriteReport", "version": 1, "data": {...}}`` with per-layer decisions and totals."""
        return {
            "type": "RewriteReport",
            "version": _REPORT_VERSION,
            "data": {
                "path": self.path,
                "noop": self.noop,
                "verified": self.verified,
                "output_error": self.output_error,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "seconds": self.seconds,
                "notes": list(self.notes),
                "config": self.config,
                "totals": self.totals(),
                "layers": [d.to_dict() for d in self.decisions],
            },
        }

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        """The JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, default=_json_default)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RewriteReport:
        """Inverse of :meth:`to_dict` (totals are recomputed).

        Raises:
            SavedModelError: not a report, or a version this einrewrite does not read.
        """
        if not isinstance(payload, Mapping) or payload.get("type") != "RewriteReport":
            raise SavedModelError(f"report: expected {{'type': 'RewriteReport', ...}}, got {str(payload)[:120]!r}")
        if payload.get("version") != _REPORT_VERSION:
            raise SavedModelError(
                f"report: version {payload.get('version')!r} is not supported (this einrewrite reads {_REPORT_VERSION})"
            )
        data = payload["data"]
        try:
            return cls(
                decisions=tuple(Decision.from_dict(d) for d in data["layers"]),
                path=data["path"],
                config=data.get("config"),
                noop=bool(data.get("noop", False)),
                notes=tuple(data.get("notes", ())),
                verified=data.get("verified"),
                output_error=data.get("output_error"),
                model_params_before=data.get("model_params_before"),
                model_params_after=data.get("model_params_after"),
                seconds=data.get("seconds"),
            )
        except (KeyError, TypeError) as e:
            raise SavedModelError(f"report: missing or malformed field {e}") from None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
