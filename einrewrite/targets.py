"""Finding the linear layers of a model and deciding which ones a config targets.

A *candidate* is anything a user could mean by "a linear layer": an ``nn.Linear``, a Hugging Face ``Conv1D``
(weight stored (in, out)), a layer einrewrite already structured, a fused 3-D expert tensor (Mixtral), or a 2-D
parameter outside any linear module (a possible ``F.linear(x, self.w)``, confirmed only by tracing). Every
candidate ends in the report, replaced or skipped with a reason.

Matching follows PEFT: ``"all-linear"``; a string is a regex ``re.fullmatch``-ed against the FQN; a list
matches a name exactly, as a ``.``-suffix, or as ``re:<regex>`` (full match).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import LayerOverride, RewriteConfig

__all__ = ["Candidate", "find_candidates", "matches", "matches_any", "override_for", "skip_reason"]

# Modules whose 2-D parameters are not linear weights applied by a matmul of the activations.
_NOT_LINEAR_OWNERS: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    nn.modules.conv._ConvNd,
    nn.MultiheadAttention,
    nn.RNNBase,
)
_ROUTER_NAMES = ("gate", "router", "w_gate", "gating")
_HEAD_NAMES = ("classifier", "score")

# Reason codes; the text a user reads is in Decision.detail.
REASONS = (
    "already_structured",
    "excluded",
    "not_targeted",
    "filtered",
    "override_dense",
    "router",
    "tied_weight",
    "fused_experts",
    "unsupported_dtype",
    "read_directly",
    "output_head",
    "below_min_features",
    "no_fit",
    "dense_cheaper",
    "needs_example_inputs",
    "not_traced",
    "not_on_forward_path",
)


@dataclass
class Candidate:
    """A linear-like thing in a model.

    Attributes:
        fqn: the name reports and targeting use: the module's FQN, or the parameter's FQN for a bare parameter.
        kind: ``"Linear"``, ``"Conv1D"``, ``"structured"``, ``"experts"`` or ``"param"`` (a bare 2-D parameter).
        module: the module itself (for ``"param"`` / ``"experts"``: the module owning the parameter).
        module_fqn: the owning module's FQN.
        param_name: the weight's attribute name on ``module``.
        d_in: input features (None when unknown before tracing).
        d_out: output features.
        has_bias: whether the layer adds a bias.
        names: every name targeting rules are matched against.
        type_name: class name of the module, for reports.
    """

    fqn: str
    kind: str
    module: nn.Module
    module_fqn: str
    param_name: str | None
    d_in: int | None
    d_out: int | None
    has_bias: bool
    names: tuple[str, ...]
    type_name: str
    weight_numel: int = 0
    shape: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_fqn(self) -> str | None:
        """FQN of the weight parameter."""
        if self.param_name is None:
            return None
        return f"{self.module_fqn}.{self.param_name}" if self.module_fqn else self.param_name

    @property
    def dense_macs(self) -> int | None:
        """MACs per token of the dense layer (None when unknown)."""
        return None if self.d_in is None or self.d_out is None else self.d_in * self.d_out


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (a linear layer with its weight stored (in, out)), recognised without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_structured(module: nn.Module) -> bool:
    """A layer einrewrite already built (EinsumLinear, the MoE layer): it carries a bound ``spec``."""
    spec = getattr(module, "spec", None)
    return spec is not None and hasattr(spec, "macs") and hasattr(spec, "to_dict")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_candidates(model: nn.Module) -> list[Candidate]:
    """Every linear-like candidate of ``model``, in module order (see the module docstring)."""
    out: list[Candidate] = []
    skip_under: list[str] = []
    for fqn, module in model.named_modules():
        if any(fqn == p or fqn.startswith(p + ".") for p in skip_under):
            continue
        type_name = type(module).__name__
        if is_structured(module):
            spec = module.spec
            out.append(
                Candidate(
                    fqn, "structured", module, fqn, None, spec.d_in, spec.d_out,
                    getattr(module, "bias", None) is not None, (fqn,), type_name,
                    weight_numel=int(spec.params), shape=(spec.d_out, spec.d_in),
                )
            )
            skip_under.append(fqn)
            continue
        if isinstance(module, nn.Linear):
            out.append(
                Candidate(
                    fqn, "Linear", module, fqn, "weight", module.in_features, module.out_features,
                    module.bias is not None, (fqn,), type_name,
                    weight_numel=module.weight.numel(), shape=tuple(module.weight.shape),
                )
            )
            continue
        if is_conv1d(module):
            d_in, d_out = module.weight.shape  # Conv1D stores (in, out)
            out.append(
                Candidate(
                    fqn, "Conv1D", module, fqn, "weight", int(d_in), int(d_out),
                    getattr(module, "bias", None) is not None, (fqn,), type_name,
                    weight_numel=module.weight.numel(), shape=(int(d_out), int(d_in)),
                )
            )
            continue
        if isinstance(module, _NOT_LINEAR_OWNERS):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            pfqn = _join(fqn, pname)
            if param.ndim == 3 and _looks_like_experts(fqn, module, pname):
                n_experts, a, b = param.shape
                out.append(
                    Candidate(
                        pfqn, "experts", module, fqn, pname, None, None, False, (pfqn, fqn), type_name,
                        weight_numel=param.numel(), shape=tuple(param.shape), extra={"n_experts": int(n_experts)},
                    )
                )
            elif param.ndim == 2:
                rows, cols = param.shape
                out.append(
                    Candidate(
                        pfqn, "param", module, fqn, pname, None, None, False, (pfqn, fqn), type_name,
                        weight_numel=param.numel(), shape=(int(rows), int(cols)),
                    )
                )
    return out


def _looks_like_experts(fqn: str, module: nn.Module, pname: str) -> bool:
    text = f"{fqn}.{pname} {type(module).__name__}".lower()
    return "expert" in text


def tied_names(model: nn.Module, param: nn.Parameter, own_fqn: str) -> list[str]:
    """Other names under which ``param`` (the same tensor object) appears in ``model``."""
    return [name for name, p in model.named_parameters(remove_duplicate=False) if p is param and name != own_fqn]


def matches(name: str, pattern: str) -> bool:
    """One list entry: ``re:<regex>`` (full match), an exact name, or a ``.``-suffix of the name."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def matches_any(names: Iterable[str], rule: str | tuple[str, ...]) -> str | None:
    """The entry of ``rule`` that matches one of ``names`` (a str rule is a full-match regex), else None."""
    names = tuple(names)
    if isinstance(rule, str):
        pattern = rule[3:] if rule.startswith("re:") else rule
        return rule if any(re.fullmatch(pattern, n) for n in names) else None
    for pattern in rule:
        if any(matches(n, pattern) for n in names):
            return pattern
    return None


def override_for(names: Iterable[str], config: RewriteConfig) -> tuple[str, LayerOverride] | None:
    """The first override whose pattern matches one of ``names`` (torchao FqnToConfig order)."""
    names = tuple(names)
    for pattern, rule in config.overrides:
        if any(matches(n, pattern) for n in names):
            return pattern, rule
    return None


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the modules ``"all-linear"`` leaves alone, as PEFT does: output embeddings and HF cls heads."""
    ids: set[int] = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # noqa: BLE001 - some models raise NotImplementedError here
            head = None
        if isinstance(head, nn.Module):
            ids.add(id(head))
    if hasattr(model, "config"):
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in _HEAD_NAMES and (isinstance(module, nn.Linear) or is_conv1d(module)):
                ids.add(id(module))
            if name.endswith(".out_proj") and name.rsplit(".", 2)[-2] in _HEAD_NAMES:
                ids.add(id(module))
    return ids


def _parent(model: nn.Module, fqn: str) -> nn.Module | None:
    if not fqn:
        return None
    return model.get_submodule(fqn.rsplit(".", 1)[0] if "." in fqn else "")


def _is_moe_like(module: nn.Module | None) -> bool:
    if module is None:
        return False
    return hasattr(module, "experts") or any(k in type(module).__name__.lower() for k in ("moe", "expert", "sparse"))


def _is_router(model: nn.Module, cand: Candidate) -> bool:
    """Routers of mixture-of-experts blocks: a "router" by name or class, or a "gate" inside an MoE block."""
    if "router" in type(cand.module).__name__.lower():
        return True
    pairs = [(cand.module_fqn.rsplit(".", 1)[-1], _parent(model, cand.module_fqn))]
    if cand.kind == "param" and cand.param_name is not None:
        pairs.append((cand.param_name, cand.module))
    for name, parent in pairs:
        low = name.lower()
        if "router" in low or (low in _ROUTER_NAMES and _is_moe_like(parent)):
            return True
    return False


def skip_reason(
    model: nn.Module, cand: Candidate, config: RewriteConfig, *, heads: set[int] | None = None
) -> tuple[str, str] | None:
    """Why ``cand`` is not rewritten, as ``(code, detail)``, or None if it is a target.

    The checks run in a fixed order: already structured, the user's rules (exclude, target, filter_fn,
    overrides), then what einrewrite cannot or should not rewrite (routers, tied weights, fused experts,
    weights read directly by the parent, output heads under "all-linear", layers below min_features).
    Budget reasons (``dense_cheaper``) come later, from the solver.
    """
    if cand.kind == "structured":
        return (
            "already_structured",
            f"already structured ({cand.module.spec.name}); rewriting a rewritten model is a no-op",
        )
    if config.exclude_modules is not None:
        hit = matches_any(cand.names, config.exclude_modules)
        if hit is not None:
            return "excluded", f"matched exclude_modules entry {hit!r}"
    if config.target_modules != "all-linear" and matches_any(cand.names, config.target_modules) is None:
        return "not_targeted", f"not matched by target_modules={_show(config.target_modules)}"
    if config.filter_fn is not None and not config.filter_fn(cand.fqn, cand.module):
        return "filtered", "filter_fn returned False"
    found = override_for(cand.names, config)
    if found is not None and found[1].dense:
        return "override_dense", f"override {found[0]!r} keeps it dense"
    explicit = config.target_modules != "all-linear"
    if _is_router(model, cand):
        return "router", "MoE router: routing logits stay dense (top-k selection is sensitive to their error)"
    if cand.param_name is not None and cand.kind != "experts":
        param = getattr(cand.module, cand.param_name)
        others = tied_names(model, param, cand.weight_fqn or "")
        if others:
            return (
                "tied_weight",
                f"weight is tied to {', '.join(others)}; replacing it would untie them (exclude it or untie first)",
            )
    if cand.param_name is not None and cand.kind in ("Linear", "Conv1D", "param"):
        dtype = getattr(cand.module, cand.param_name).dtype
        if not dtype.is_floating_point:
            return (
                "unsupported_dtype",
                f"weight dtype {dtype} (quantized?) cannot be projected; rewrite the float model, then quantize",
            )
    if cand.kind == "experts":
        return (
            "fused_experts",
            f"fused 3-D expert tensor {tuple(cand.shape)} (experts, out, in) is not a linear layer; einrewrite "
            "rewrites nn.Linear, Conv1D and linear ops on 2-D parameters — leave the experts dense or build a "
            "btt_moe layer for them",
        )
    if cand.kind == "Linear":
        if isinstance(_parent(model, cand.fqn), nn.MultiheadAttention):
            return (
                "read_directly",
                "nn.MultiheadAttention reads out_proj.weight directly instead of calling the module; a swap "
                "would be bypassed",
            )
    if not explicit and heads is not None and id(cand.module) in heads and cand.kind in ("Linear", "Conv1D"):
        return (
            "output_head",
            "'all-linear' leaves the output head dense (as PEFT does); name it in target_modules to rewrite it",
        )
    if cand.d_in is not None and cand.d_out is not None and min(cand.d_in, cand.d_out) < config.min_features:
        return (
            "below_min_features",
            f"{cand.d_in}->{cand.d_out} is below min_features={config.min_features}; lower min_features to "
            "include it",
        )
    return None


def output_heads(model: nn.Module) -> set[int]:
    """ids of the output-head modules (public wrapper of the "all-linear" policy)."""
    return _output_heads(model)


def _show(rule: Any) -> str:
    return repr(list(rule)) if isinstance(rule, tuple) else repr(rule)
