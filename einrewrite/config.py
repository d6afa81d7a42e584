"""What to rewrite and how: `RewriteConfig`, `FlopBudget` and per-layer `LayerOverride`.

Targeting follows PEFT (``target_modules`` / ``exclude_modules``, ``"all-linear"``) and torchao (ordered
per-FQN overrides, ``re:`` regexes, a ``filter_fn`` escape hatch that is AND-ed with the declarative rules).
Configs are frozen, validated on construction and round-trip through JSON as ``{"type", "version", "data"}``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import EinrewriteError
from .structures import STRUCTURES

__all__ = ["ConfigError", "FlopBudget", "LayerOverride", "RewriteConfig", "structure_from_dict", "structure_to_dict"]

logger = logging.getLogger(__name__)

_CONFIG_VERSION = 1
INIT_CHOICES = ("project", "mup")


class ConfigError(EinrewriteError, ValueError):
    """A configuration value is invalid (the message names the field, the value and what is allowed)."""


# ---- structures as config values -------------------------------------------------------------------------
def _check_structure(value: Any, where: str) -> Any:
    """A registry name or an instance of a registered structure class; raises ConfigError otherwise."""
    if isinstance(value, str):
        if value not in STRUCTURES:
            raise ConfigError(
                f"{where}: unknown structure {value!r}; registered: {', '.join(sorted(STRUCTURES))}"
            )
        return value
    if type(value) in STRUCTURES.values() or callable(getattr(value, "bind", None)):
        return value
    raise ConfigError(
        f"{where}: expected a structure name ({', '.join(sorted(STRUCTURES))}) or a structure instance such as "
        f"einrewrite.structures.BTT(rank=2), got {type(value).__name__} {value!r}"
    )


def structure_to_dict(value: Any) -> Any:
    """JSON form of a structure: its name, or ``{"structure": name, "hyper": {...}}`` for an instance."""
    if isinstance(value, str):
        return value
    hyper = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return {"structure": type(value).name, "hyper": hyper}


def structure_from_dict(data: Any, where: str = "structure") -> Any:
    """Inverse of :func:`structure_to_dict`."""
    if isinstance(data, str):
        return _check_structure(data, where)
    if not isinstance(data, Mapping) or "structure" not in data:
        raise ConfigError(
            f"{where}: expected a structure name or {{'structure': name, 'hyper': {{...}}}}, got {data!r}"
        )
    name = data["structure"]
    _check_structure(name, where)
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(data.get("hyper") or {}).items()}
    try:
        return STRUCTURES[name](**hyper)
    except (TypeError, ValueError) as e:
        allowed = ", ".join(f.name for f in dataclasses.fields(STRUCTURES[name])) or "none"
        raise ConfigError(
            f"{where}: structure {name!r} rejects hyper-parameters {hyper}: {e}; allowed: {allowed}"
        ) from None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _envelope(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "version": _CONFIG_VERSION, "data": data}


def _open_envelope(kind: str, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, Mapping):
        raise ConfigError(f"{kind}.from_dict: expected a dict, got {type(payload).__name__}")
    if payload.get("type") != kind:
        raise ConfigError(f"{kind}.from_dict: expected type {kind!r}, got {payload.get('type')!r}")
    if payload.get("version") != _CONFIG_VERSION:
        raise ConfigError(
            f"{kind}.from_dict: unsupported version {payload.get('version')!r}; this einrewrite reads version "
            f"{_CONFIG_VERSION}"
        )
    data = payload.get("data")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{kind}.from_dict: 'data' must be a dict, got {type(data).__name__}")
    return dict(data)


# ---- budget ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FlopBudget:
    """How many multiply-accumulates per token the rewritten layers may cost; exactly one field is set.

    Args:
        ratio: per layer: each rewritten layer costs at most ``ratio`` × its dense MACs (0.25 = 25%).
            Values above 1 are allowed for fixed structures (e.g. an exact full-rank factorization); a searched
            structure never picks a point that costs as much as the dense layer.
        macs_per_token: for the whole model: the rewritten layers together cost at most this many MACs per
            token, allocated across layers (layers that stay dense are reported but not counted).

    Examples:
        >>> FlopBudget(ratio=0.25).limit(1000)
        250
    """

    ratio: float | None = None
    macs_per_token: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.macs_per_token is None):
            raise ConfigError(
                f"FlopBudget: give exactly one of ratio (per layer, e.g. 0.25) or macs_per_token (whole model), "
                f"got ratio={self.ratio!r}, macs_per_token={self.macs_per_token!r}"
            )
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                math.isfinite(self.ratio) and self.ratio > 0
            ):
                raise ConfigError(f"FlopBudget.ratio must be a number > 0 (0.25 = 25% of dense), got {self.ratio!r}")
            object.__setattr__(self, "ratio", float(self.ratio))
        if self.macs_per_token is not None:
            value = self.macs_per_token
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FlopBudget.macs_per_token must be an integer >= 1, got {self.macs_per_token!r}")
            object.__setattr__(self, "macs_per_token", value)

    @property
    def is_global(self) -> bool:
        """True for a whole-model ``macs_per_token`` budget, False for a per-layer ``ratio``."""
        return self.macs_per_token is not None

    def limit(self, dense_macs: int) -> int:
        """Largest MACs per token a layer of ``dense_macs`` may cost under a per-layer ratio."""
        if self.ratio is None:
            raise ConfigError("FlopBudget.limit needs a per-layer ratio; a macs_per_token budget is allocated")
        return math.floor(self.ratio * dense_macs + 1e-9)

    def describe(self) -> str:
        """Short text: ``25% of dense per layer`` or ``1,234 MACs/token in total``."""
        if self.ratio is not None:
            return f"{self.ratio:.4g}x dense MACs per layer"
        return f"{self.macs_per_token:,} MACs/token for all rewritten layers"

    def _data(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "macs_per_token": self.macs_per_token}

    def to_dict(self) -> dict[str, Any]:
        """``{"type": "FlopBudget", "version": 1, "data": {...}}``."""
        return _envelope("FlopBudget", self._data())

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> FlopBudget:
        """Inverse of :meth:`to_dict`."""
        return cls._from_data(_open_envelope("FlopBudget", payload))

    @classmethod
    def _from_data(cls, data: Mapping[str, Any]) -> FlopBudget:
        unknown = set(data) - {"ratio", "macs_per_token"}
        if unknown:
            raise ConfigError(f"FlopBudget: unknown fields {sorted(unknown)}; allowed: ratio, macs_per_token")
        return cls(ratio=data.get("ratio"), macs_per_token=data.get("macs_per_token"))


# ---- per-layer overrides ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LayerOverride:
    """What to do with the layers an override pattern matches.

    Args:
        structure: a registry name (hyper-parameters sized to the budget) or a structure instance (fixed
            hyper-parameters, checked against the budget); None keeps the config's structure.
        budget: a per-layer budget (``FlopBudget(ratio=...)``) for these layers; None keeps the config's.
        dense: keep these layers dense (reported as skipped by override).
    """

    structure: Any = None
    budget: FlopBudget | None = None
    dense: bool = False

    def __post_init__(self) -> None:
        if self.structure is not None:
            _check_structure(self.structure, "LayerOverride.structure")
        if self.budget is not None:
            if not isinstance(self.budget, FlopBudget):
                raise ConfigError(f"LayerOverride.budget must be a FlopBudget, got {self.budget!r}")
            if self.budget.is_global:
                raise ConfigError(
                    "LayerOverride.budget must be per layer (FlopBudget(ratio=...)); a macs_per_token budget "
                    "belongs to RewriteConfig.budget"
                )
        if self.dense and (self.structure is not None or self.budget is not None):
            raise ConfigError("LayerOverride: dense=True keeps the layer dense; do not also set structure or budget")

    def to_data(self) -> Any:
        """JSON form: ``null`` for dense, a structure, or a dict."""
        if self.dense:
            return None
        if self.budget is None and self.structure is not None:
            return structure_to_dict(self.structure)
        return {
            "structure": None if self.structure is None else structure_to_dict(self.structure),
            "budget": None if self.budget is None else self.budget._data(),
        }

    @classmethod
    def coerce(cls, value: Any, where: str) -> LayerOverride:
        """Accepts None (keep dense), a structure name or instance, a FlopBudget or a LayerOverride."""
        if isinstance(value, LayerOverride):
            return value
        if value is None:
            return cls(dense=True)
        if isinstance(value, FlopBudget):
            return cls(budget=value)
        try:
            return cls(structure=_check_structure(value, where))
        except ConfigError:
            raise
        except Exception as e:  # pragma: no cover - defensive
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_data(cls, data: Any, where: str) -> LayerOverride:
        """Inverse of :meth:`to_data`."""
        if data is None:
            return cls(dense=True)
        if isinstance(data, Mapping) and "budget" in data:
            unknown = set(data) - {"structure", "budget"}
            if unknown:
                raise ConfigError(f"{where}: unknown fields {sorted(unknown)}; allowed: structure, budget")
            structure = None if data.get("structure") is None else structure_from_dict(data["structure"], where)
            budget = None if data.get("budget") is None else FlopBudget._from_data(data["budget"])
            return cls(structure=structure, budget=budget)
        return cls(structure=structure_from_dict(data, where))


# ---- the config ------------------------------------------------------------------------------------------
Patterns = tuple[str, ...]


def _patterns(value: Any, where: str, *, allow_all_linear: bool) -> str | Patterns | None:
    """Normalise a PEFT-style target: a str (regex, or "all-linear") or a sequence of names."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear" and not allow_all_linear:
            raise ConfigError(f"{where}: 'all-linear' is only meaningful for target_modules")
        if not value:
            raise ConfigError(f"{where}: an empty string matches nothing; use None or a list of names")
        _compile_check(value, where)
        return value
    if isinstance(value, Sequence):
        items = tuple(value)
        for item in items:
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{where}: every entry must be a non-empty string, got {item!r}")
            if item.startswith("re:"):
                _compile_check(item, where)
        return items
    raise ConfigError(f"{where}: expected a string or a list of strings, got {type(value).__name__} {value!r}")


def _compile_check(pattern: str, where: str) -> None:
    import re

    text = pattern[3:] if pattern.startswith("re:") else pattern
    if pattern == "all-linear":
        return
    try:
        re.compile(text)
    except re.error as e:
        raise ConfigError(f"{where}: {pattern!r} is not a valid regular expression: {e}") from None


@dataclass(frozen=True, kw_only=True)
class RewriteConfig:
    """Everything :func:`einrewrite.rewrite` needs to know, validated on construction.

    Args:
        structure: a registry name (``"btt"``; hyper-parameters are sized per layer to the budget) or a
            structure instance (``BTT(rank=2)``; the same hyper-parameters everywhere, checked against the budget).
        budget: a :class:`FlopBudget` (default: 25% of each layer's dense MACs).
        target_modules: ``"all-linear"`` (every ``nn.Linear``, HF ``Conv1D`` and linear op on a parameter, minus
            the output head, as in PEFT), a string (regex, ``re.fullmatch`` on the FQN), or a list of names, each
            an exact FQN, a ``.``-suffix of one (``"q_proj"``) or ``"re:<regex>"``.
        exclude_modules: same semantics, checked first.
        filter_fn: ``filter_fn(fqn, module) -> bool``, AND-ed with the rules above (Python only, not saved).
        overrides: ordered ``{pattern: value}``, first match wins; a pattern is an exact FQN, a ``.``-suffix or
            ``re:<regex>``; a value is None (keep dense), a structure name or instance, a per-layer
            ``FlopBudget`` or a :class:`LayerOverride`.
        init: ``"project"`` (closest structured weight to the dense one, default) or ``"mup"`` (fresh µP init,
            for training from scratch).
        min_features: layers with ``min(d_in, d_out) < min_features`` stay dense.

    Examples:
        >>> cfg = RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.25), exclude_modules=["lm_head"])
        >>> RewriteConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    structure: Any = "btt"
    budget: FlopBudget = field(default_factory=lambda: FlopBudget(ratio=0.25))
    target_modules: str | Patterns = "all-linear"
    exclude_modules: str | Patterns | None = None
    filter_fn: Callable[[str, Any], bool] | None = None
    overrides: tuple[tuple[str, LayerOverride], ...] = ()
    init: Literal["project", "mup"] = "project"
    min_features: int = 16

    def __post_init__(self) -> None:
        _check_structure(self.structure, "RewriteConfig.structure")
        if not isinstance(self.budget, FlopBudget):
            raise ConfigError(
                f"RewriteConfig.budget must be a FlopBudget (FlopBudget(ratio=0.25) or FlopBudget(macs_per_token=N)), "
                f"got {self.budget!r}"
            )
        target = _patterns(self.target_modules, "RewriteConfig.target_modules", allow_all_linear=True)
        if target is None or target == ():
            raise ConfigError(
                "RewriteConfig.target_modules: give 'all-linear', a regex or a list of names; an empty target "
                "matches nothing"
            )
        object.__setattr__(self, "target_modules", target)
        exclude = _patterns(self.exclude_modules, "RewriteConfig.exclude_modules", allow_all_linear=False)
        object.__setattr__(self, "exclude_modules", exclude)
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ConfigError(f"RewriteConfig.filter_fn must be callable(fqn, module) -> bool, got {self.filter_fn!r}")
        object.__setattr__(self, "overrides", self._normalise_overrides(self.overrides))
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"RewriteConfig.init must be one of {INIT_CHOICES}, got {self.init!r}")
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 0:
            raise ConfigError(f"RewriteConfig.min_features must be an integer >= 0, got {self.min_features!r}")

    @staticmethod
    def _normalise_overrides(value: Any) -> tuple[tuple[str, LayerOverride], ...]:
        if value is None:
            return ()
        items = list(value.items()) if isinstance(value, Mapping) else list(value)
        out: list[tuple[str, LayerOverride]] = []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and item[0]):
                raise ConfigError(
                    f"RewriteConfig.overrides: expected (pattern, value) pairs or a dict, got entry {item!r}"
                )
            pattern, rule = item
            if pattern.startswith("re:"):
                _compile_check(pattern, f"RewriteConfig.overrides[{pattern!r}]")
            out.append((pattern, LayerOverride.coerce(rule, f"RewriteConfig.overrides[{pattern!r}]")))
        return tuple(out)

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"type": "RewriteConfig", "version": 1, "data": {...}}``; JSON-able.

        ``filter_fn`` cannot be written to JSON; its qualified name is recorded for information only.
        """
        fn = self.filter_fn
        return _envelope(
            "RewriteConfig",
            {
                "structure": structure_to_dict(self.structure),
                "budget": self.budget._data(),
                "target_modules": _jsonable(self.target_modules),
                "exclude_modules": _jsonable(self.exclude_modules),
                "filter_fn": (
                    None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
                ),
                "overrides": [[pattern, rule.to_data()] for pattern, rule in self.overrides],
                "init": self.init,
                "min_features": self.min_features,
            },
        )

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> RewriteConfig:
        """Inverse of :meth:`to_dict`; this is what ``--config file.json`` reads.

        Raises:
            ConfigError: wrong type or version, unknown fields or invalid values.
        """
        data = _open_envelope("RewriteConfig", payload)
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"RewriteConfig: unknown fields {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
        kwargs: dict[str, Any] = {}
        if "structure" in data:
            kwargs["structure"] = structure_from_dict(data["structure"], "RewriteConfig.structure")
        if "budget" in data:
            if not isinstance(data["budget"], Mapping):
                raise ConfigError(
                    f"RewriteConfig.budget: expected {{'ratio': ...}} or {{'macs_per_token': ...}}, "
                    f"got {data['budget']!r}"
                )
            kwargs["budget"] = FlopBudget._from_data(data["budget"])
        for key in ("target_modules", "exclude_modules"):
            if key in data:
                value = data[key]
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        if data.get("filter_fn") is not None:
            logger.warning(
                "RewriteConfig.from_dict: filter_fn %s cannot be restored from JSON and is dropped; "
                "pass filter_fn again in Python if you need it",
                data["filter_fn"],
            )
        if "overrides" in data:
            raw = data["overrides"]
            pairs = raw.items() if isinstance(raw, Mapping) else raw
            overrides = []
            for item in pairs or ():
                if not (isinstance(item, (list, tuple)) and len(item) == 2):
                    raise ConfigError(f"RewriteConfig.overrides: expected [pattern, value] pairs, got {item!r}")
                pattern, rule = item
                overrides.append((pattern, LayerOverride.from_data(rule, f"RewriteConfig.overrides[{pattern!r}]")))
            kwargs["overrides"] = tuple(overrides)
        for key in ("init", "min_features"):
            if key in data:
                kwargs[key] = data[key]
        return cls(**kwargs)

    def describe(self) -> str:
        """One line for logs and reports."""
        name = self.structure if isinstance(self.structure, str) else structure_to_dict(self.structure)
        return f"structure={name}, budget={self.budget.describe()}, target={self.target_modules!r}, init={self.init}"
