"""Structure search: which structure trains best for a given compute budget (paper-notes §1.4, §2, §5).

Candidates come from three sources:

* ``named``: the registry's structures (``dense``, ``low_rank``, ``btt``, ``btt_moe`` ...);
* ``paper``: the θ points of the paper's experiments (:data:`PAPER_THETAS`, paper-notes §1.4);
* ``sampled``: θ drawn uniformly from the canonical region (:func:`sample_thetas`, stick-breaking).

Each candidate is **sized to the same budget** of forward MACs per token of the whole model, then trained
briefly by the task and ranked by validation loss:

* a registry structure with hyper-parameters to choose (``low_rank``, ``btt``, ``btt_moe`` ...) keeps the task's
  base width and the budget solver (:class:`~einrewrite.FlopBudget` ``macs_per_token``) picks its ranks;
* a fixed structure (``dense``, any θ) has nothing to choose, so the model *width* is: the widest of the task's
  widths whose model fits the budget (iso-FLOP sizing, paper-notes §5.4).

Candidates can be filtered by the taxonomy with a safe expression (:func:`taxonomy_filter`), e.g.
``"omega == 0 and psi == 1"``; names are ``omega psi nu alpha beta gamma delta epsilon phi rho``.

Results are written to a CSV row by row; running again with the same CSV skips what is already there (resume).

Examples:
    >>> task = RegressionTask(d=16, steps=20)
    >>> result = search(task, named=["dense", "low_rank"], paper=False, flops_ratio=1.0, progress=False)
    >>> [row.candidate for row in result.ranked()]
    ['dense', 'low_rank']
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import logging
import math
import operator
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FlopBudget, RewriteConfig
from .errors import EinrewriteError
from .structures import STRUCTURES, Einsum
from .tables import format_table
from .theta import Theta, parse_theta, validate_theta
from .train import TrainConfig, active_macs_per_token, train

__all__ = [
    "PAPER_THETAS",
    "TAXONOMY_NAMES",
    "Candidate",
    "LMTask",
    "RegressionTask",
    "SearchError",
    "SearchResult",
    "SearchRow",
    "SearchTask",
    "make_candidates",
    "sample_thetas",
    "search",
    "taxonomy_filter",
]

logger = logging.getLogger(__name__)


class SearchError(EinrewriteError, ValueError):
    """A search setting, filter or resumed CSV is invalid (the message says what is allowed)."""


# ---- candidates -----------------------------------------------------------------------------------------
#: The θ points of the paper's GPT/MLP experiments (``experiments/gpt.sh``, ``mlp.sh``), paper-notes §1.4.
PAPER_THETAS: tuple[str, ...] = (
    # full-rank BTT
    "(.5|0|.5|0|.5|.5|0)", "(.33|0|.67|0|.67|.33|0)", "(.25|0|.75|0|.75|.25|0)", "(.67|0|.33|0|.33|.67|0)",
    "(.75|0|.25|0|.25|.75|0)",
    # low-rank BTT
    "(.67|0|.33|0|.67|.33|0)", "(.33|0|.67|0|.33|.67|0)", "(.75|0|.25|0|.75|.25|0)", "(.25|0|.75|0|.25|.75|0)",
    # BTT with a bond
    "(.5|0|.5|0|.5|.5|.25)", "(.5|0|.5|0|.5|.5|.33)", "(.33|0|.67|0|.67|.33|.25)", "(.67|0|.33|0|.33|.67|.25)",
    "(.67|0|.33|0|.67|.33|.25)", "(.33|0|.67|0|.33|.67|.25)",
    # tensor-train / Kronecker
    "(.5|.5|0|.5|.5|0|0)", "(.33|.67|0|.33|.67|0|0)", "(.5|.5|0|.5|.5|0|.25)", "(.33|.67|0|.33|.67|0|.25)",
    # low rank
    "(1|0|0|0|1|0|.75)", "(1|0|0|0|1|0|.5)",
    # generic
    "(.5|.25|.25|.25|.5|.25|0)", "(.5|.25|.25|.25|.5|.25|.25)",
)


@dataclass(frozen=True)
class Candidate:
    """One structure to try.

    Attributes:
        label: unique name in tables and the CSV (a registry name, or ``θ=(…)``).
        structure: a registry name (sized by the budget solver) or a structure instance (fixed).
        source: ``"named"``, ``"paper"`` or ``"sampled"``.
        theta: θ when the candidate is a point of the space (None for registry names).
    """

    label: str
    structure: Any
    source: str
    theta: Theta | None = None

    @property
    def is_dense(self) -> bool:
        """The plain dense model (no rewrite)."""
        return self.structure == "dense"

    @property
    def is_fixed(self) -> bool:
        """Nothing to size but the width: dense or a structure instance."""
        return self.is_dense or not isinstance(self.structure, str)


def _theta_candidate(theta: Theta, source: str) -> Candidate:
    return Candidate(f"θ={theta}", Einsum(theta=tuple(theta)), source, theta)


def _stick(rng: random.Random, n: int) -> list[float]:
    """A uniform point of the (n-1)-simplex by stick-breaking: piece i takes a Beta(1, n-1-i) share of the rest."""
    left, parts = 1.0, []
    for i in range(n - 1):
        share = 1.0 - rng.random() ** (1.0 / (n - 1 - i))  # Beta(1, n-1-i) by inversion
        parts.append(left * share)
        left -= parts[-1]
    return [*parts, left]


def sample_thetas(n: int, *, seed: int = 0, digits: int = 3, max_tries: int = 100_000) -> list[Theta]:
    """``n`` θ drawn uniformly from the canonical region (paper-notes §2.2), reproducible from ``seed``.

    (α, β, γ) and (δ, ε, φ) are uniform on their simplices (stick-breaking), ρ is uniform on [0, 1]; a draw is
    kept when it lies in the canonical region (``θρ ≤ min(θα, θε)`` and ``min(θα, θε) ≥ min(θβ, θδ)``), so the
    kept points are uniform over the region. Values are rounded to ``digits`` decimals (each side is rounded so
    that it still sums to 1 exactly).

    Raises:
        SearchError: ``n`` < 0.

    Examples:
        >>> [round(sum(t[:3]), 6) for t in sample_thetas(2, seed=1)]
        [1.0, 1.0]
    """
    if n < 0:
        raise SearchError(f"sample_thetas: n must be >= 0, got {n}")
    rng = random.Random(seed)
    out: list[Theta] = []
    for _ in range(max_tries):
        if len(out) == n:
            break
        a, b, g = _rounded(_stick(rng, 3), digits)
        d, e, f = _rounded(_stick(rng, 3), digits)
        theta = Theta(a, b, g, d, e, f, round(rng.random(), digits))
        if theta.is_dense:
            continue
        try:
            validate_theta(theta)
        except EinrewriteError:
            continue
        out.append(theta)
    return out


def _rounded(side: list[float], digits: int) -> tuple[float, float, float]:
    first, second = round(side[0], digits), round(side[1], digits)
    return first, second, round(1.0 - first - second, digits)


def make_candidates(
    *,
    named: bool | Sequence[str] = True,
    paper: bool = True,
    samples: int = 0,
    thetas: Iterable[str | Sequence[float]] = (),
    seed: int = 0,
) -> list[Candidate]:
    """The candidate list: registry names, the paper's θ, user θ and ``samples`` sampled θ (duplicates dropped).

    Args:
        named: True for every registry structure but ``einsum`` (which needs a θ), or a list of names.
        paper: include :data:`PAPER_THETAS`.
        samples: how many θ to sample from the canonical region.
        thetas: extra θ (text or 7 numbers).
        seed: seeds the sampling.

    Raises:
        SearchError: an unknown structure name.
        InvalidThetaError: a given θ is outside the space.
    """
    names = sorted(n for n in STRUCTURES if n != "einsum") if named is True else list(named or ())
    unknown = [n for n in names if n not in STRUCTURES or n == "einsum"]
    if unknown:
        allowed = ", ".join(sorted(n for n in STRUCTURES if n != "einsum"))
        raise SearchError(f"search: unknown structure(s) {unknown}; choose from {allowed} (give θ for einsum)")
    out = [Candidate(n, n, "named") for n in names]
    out += [_theta_candidate(validate_theta(parse_theta(t)), "user") for t in thetas]
    if paper:
        out += [_theta_candidate(parse_theta(t), "paper") for t in PAPER_THETAS]
    out += [_theta_candidate(t, "sampled") for t in sample_thetas(samples, seed=seed)]
    seen: set[str] = set()
    unique = []
    for c in out:
        if c.label not in seen:
            seen.add(c.label)
            unique.append(c)
    return unique


# ---- the taxonomy filter --------------------------------------------------------------------------------
TAXONOMY_NAMES = ("omega", "psi", "nu", "alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho")
_CMP: dict[type, Callable[[float, float], bool]] = {
    ast.Eq: lambda a, b: math.isclose(a, b, abs_tol=1e-6),
    ast.NotEq: lambda a, b: not math.isclose(a, b, abs_tol=1e-6),
    ast.Lt: lambda a, b: a < b - 1e-9,
    ast.LtE: lambda a, b: a <= b + 1e-9,
    ast.Gt: lambda a, b: a > b + 1e-9,
    ast.GtE: lambda a, b: a >= b - 1e-9,
}
_BIN: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}


def taxonomy_filter(expression: str) -> Callable[[dict[str, float]], bool]:
    """Compile a filter such as ``"omega == 0 and psi == 1"`` into a predicate over taxonomy values.

    Only numbers, the names in :data:`TAXONOMY_NAMES`, ``+ - * /``, comparisons (``==`` and ``!=`` with a 1e-6
    tolerance), ``and``, ``or``, ``not`` and parentheses are allowed; nothing is ``eval``-ed.

    Raises:
        SearchError: a syntax error or anything outside that grammar.

    Examples:
        >>> keep = taxonomy_filter("omega == 0 and psi == 1")
        >>> keep({"omega": 0.0, "psi": 1.0}), keep({"omega": 0.5, "psi": 1.0})
        (True, False)
    """
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise SearchError(
            f"filter {expression!r} is not a valid expression ({e.msg}); e.g. 'omega == 0 and psi == 1'"
        ) from None
    _check_node(tree.body, expression)

    def predicate(values: dict[str, float]) -> bool:
        return bool(_eval(tree.body, values, expression))

    return predicate


def _check_node(node: ast.AST, text: str) -> None:
    allowed = (ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.Compare, ast.BinOp,
               ast.Name, ast.Load, ast.Constant, *_CMP, *_BIN)
    for child in ast.walk(node):
        if not isinstance(child, allowed):
            raise SearchError(
                f"filter {text!r}: {type(child).__name__} is not allowed; use numbers, {', '.join(TAXONOMY_NAMES)}, "
                "+ - * /, comparisons, and/or/not"
            )
        if isinstance(child, ast.Name) and child.id not in TAXONOMY_NAMES:
            raise SearchError(f"filter {text!r}: unknown name {child.id!r}; allowed: {', '.join(TAXONOMY_NAMES)}")
        if isinstance(child, ast.Constant) and (
            isinstance(child.value, bool) or not isinstance(child.value, (int, float))
        ):
            raise SearchError(f"filter {text!r}: only numbers are allowed as constants, got {child.value!r}")


def _eval(node: ast.AST, values: dict[str, float], text: str) -> Any:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id not in values:
            raise SearchError(f"filter {text!r}: {node.id} is not known for this candidate")
        return float(values[node.id])
    if isinstance(node, ast.BoolOp):
        results = (bool(_eval(v, values, text)) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, values, text)
        return (not value) if isinstance(node.op, ast.Not) else (-value if isinstance(node.op, ast.USub) else value)
    if isinstance(node, ast.BinOp):
        return _BIN[type(node.op)](_eval(node.left, values, text), _eval(node.right, values, text))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, values, text)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _eval(comparator, values, text)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    raise SearchError(f"filter {text!r}: cannot evaluate {type(node).__name__}")  # pragma: no cover


def _taxonomy(theta: Any, omega: float, psi: float, nu: float) -> dict[str, float]:
    values = {"omega": float(omega), "psi": float(psi), "nu": float(nu)}
    if theta is not None:
        values |= dict(zip(TAXONOMY_NAMES[3:], (float(v) for v in theta), strict=True))
    return values


# ---- tasks ----------------------------------------------------------------------------------------------
class SearchTask(Protocol):
    """What :func:`search` trains: a family of models indexed by width, and a brief training run.

    ``build(width, config, seed)`` returns the model (dense when ``config`` is None, else rewritten with it) and
    the ``RewriteReport`` (None for dense); ``macs(model)`` its forward MACs per token; ``fit(model, seed)``
    trains it and returns the validation loss.
    """

    name: str
    base_width: int
    widths: tuple[int, ...]
    min_features: int

    def build(self, width: int, config: RewriteConfig | None, seed: int) -> tuple[nn.Module, Any]: ...

    def macs(self, model: nn.Module) -> int: ...

    def fit(self, model: nn.Module, seed: int) -> float: ...


@dataclass
class LMTask:
    """Character-level language modelling with :class:`einrewrite.gpt.GPT` on a corpus (default: the stdlib).

    Args:
        corpus: train/validation tokens (default: ``load_corpus(max_bytes=1_000_000)``).
        model: the base :class:`~einrewrite.gpt.GPTConfig`; its ``d_model`` is the base width.
        train: the brief training run (:class:`~einrewrite.train.TrainConfig`).
        widths: model widths a fixed structure may take (default: multiples of ``d_head`` up to 4x the base).
    """

    corpus: Any = None
    model: Any = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, batch_size=16, block_size=64,
                                                                   warmup=10, eval_every=100, eval_batches=4))
    widths: tuple[int, ...] = ()
    name: str = "lm"
    min_features: int = 1

    def __post_init__(self) -> None:
        from .data import load_corpus
        from .gpt import GPTConfig

        if self.corpus is None:
            self.corpus = load_corpus(max_bytes=1_000_000)
        if self.model is None:
            self.model = GPTConfig(d_model=64, d_head=16, n_layer=2, block_size=self.train.block_size)
        self.model = replace(self.model, vocab_size=self.corpus.vocab.size)
        if not self.widths:
            head = self.model.d_head
            self.widths = tuple(range(head, 4 * self.model.d_model + 1, head))

    @property
    def base_width(self) -> int:
        """The width registry structures are sized at (the base model's ``d_model``)."""
        return int(self.model.d_model)

    def build(self, width: int, config: RewriteConfig | None, seed: int) -> tuple[nn.Module, Any]:
        """The GPT at ``width`` (µP zero-init after the rewrite, see :func:`einrewrite.gpt.build_gpt`)."""
        from .gpt import build_gpt

        return build_gpt(replace(self.model, d_model=width), config, seed=seed)

    def macs(self, model: nn.Module) -> int:
        """All forward MACs per token at the training context."""
        return active_macs_per_token(model, self.train.block_size).total

    def fit(self, model: nn.Module, seed: int) -> float:
        """Validation loss (nats/token) after the brief training run."""
        return train(model, self.corpus, replace(self.train, seed=seed)).final_val_loss


@dataclass
class RegressionTask:
    """Synthetic regression ``y = W* x`` with a random orthogonal ``W*`` (full rank, d x d), learned by a
    two-layer linear student ``x -> W2 W1 x`` of hidden width ``w`` (default widths 4, 8, ..., 2d); loss is
    MSE relative to ``E|y|²``.

    A structure that cannot reach full rank (low rank, ψ < 1) cannot fit it; dense can.
    """

    d: int = 32
    steps: int = 150
    batch_size: int = 128
    lr: float = 1e-2
    widths: tuple[int, ...] = ()
    name: str = "regression"
    min_features: int = 1

    def __post_init__(self) -> None:
        if not self.widths:
            self.widths = tuple(range(4, 2 * self.d + 1, 4))

    @property
    def base_width(self) -> int:
        """The hidden width registry structures are sized at (``d``)."""
        return self.d

    def _target(self) -> Tensor:
        q, _ = torch.linalg.qr(torch.randn(self.d, self.d, generator=torch.Generator().manual_seed(1234)))
        return q  # (d, d), orthogonal

    def build(self, width: int, config: RewriteConfig | None, seed: int) -> tuple[nn.Module, Any]:
        """The student at hidden width ``width``, rewritten with µP init when ``config`` is given."""
        from .api import rewrite

        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(self.d, width, bias=False), nn.Linear(width, self.d, bias=False))
        if config is None:
            return model, None
        return rewrite(model, config, (torch.randn(4, self.d),), progress=False)

    def macs(self, model: nn.Module) -> int:
        """Forward MACs per example."""
        return active_macs_per_token(model, 1).total

    def fit(self, model: nn.Module, seed: int) -> float:
        """Relative MSE on a fixed held-out set after ``steps`` Adam steps on fresh Gaussian inputs."""
        from .init import param_groups

        target = self._target()
        generator = torch.Generator().manual_seed(seed)
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in param_groups(model, self.lr)]
        optimizer = torch.optim.Adam(groups)
        for _ in range(self.steps):
            x = torch.randn(self.batch_size, self.d, generator=generator)  # (N, d)
            loss = F.mse_loss(model(x), x @ target.T)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        x_val = torch.randn(1024, self.d, generator=torch.Generator().manual_seed(99))  # (N, d)
        with torch.no_grad():
            y = x_val @ target.T  # (N, d)
            return float(F.mse_loss(model(x_val), y) / y.pow(2).mean())


# ---- results --------------------------------------------------------------------------------------------
_FIELDS = ("candidate", "source", "structure", "theta", "omega", "psi", "nu", "width", "params", "macs",
           "budget_macs", "val_loss", "status", "detail", "seconds")


@dataclass(frozen=True)
class SearchRow:
    """One candidate's outcome; ``status`` is ``"ok"``, ``"filtered"`` or ``"skipped"`` (with ``detail``)."""

    candidate: str
    source: str
    structure: str
    theta: str
    omega: float | None
    psi: float | None
    nu: float | None
    width: int | None
    params: int | None
    macs: int | None
    budget_macs: int
    val_loss: float | None
    status: str
    detail: str = ""
    seconds: float = 0.0

    def to_csv(self) -> dict[str, Any]:
        """Strings and numbers for ``csv.DictWriter`` (None as an empty cell)."""
        return {k: "" if v is None else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> SearchRow:
        """Inverse of :meth:`to_csv`."""

        def num(key: str, kind: Callable[[str], Any]) -> Any:
            return kind(row[key]) if row.get(key, "") != "" else None

        return cls(
            candidate=row["candidate"], source=row["source"], structure=row["structure"], theta=row["theta"],
            omega=num("omega", float), psi=num("psi", float), nu=num("nu", float), width=num("width", int),
            params=num("params", int), macs=num("macs", int), budget_macs=int(row["budget_macs"]),
            val_loss=num("val_loss", float), status=row["status"], detail=row.get("detail", ""),
            seconds=float(row.get("seconds") or 0.0),
        )


@dataclass
class SearchResult:
    """All rows of a search, in the order they were tried; :meth:`ranked` sorts them."""

    rows: list[SearchRow]
    budget_macs: int
    resumed: int = 0

    def ranked(self) -> list[SearchRow]:
        """Trained candidates by validation loss (best first), then the filtered and skipped ones."""
        ok = sorted((r for r in self.rows if r.status == "ok"), key=lambda r: (r.val_loss, r.candidate))
        return ok + [r for r in self.rows if r.status != "ok"]

    @property
    def best(self) -> SearchRow:
        """The candidate with the lowest validation loss."""
        ranked = self.ranked()
        if not ranked or ranked[0].status != "ok":
            raise SearchError("search: no candidate was trained (all were filtered or skipped); see the table")
        return ranked[0]

    def table(self) -> str:
        """Ranked table: rank, candidate, θ, ω, ψ, ν, width, params, MACs/token, loss."""
        rows = []
        for i, r in enumerate(self.ranked(), 1):
            rows.append((
                str(i) if r.status == "ok" else "-", r.candidate, r.theta or "-",
                *(f"{v:.2f}" if v is not None else "-" for v in (r.omega, r.psi, r.nu)),
                str(r.width or "-"), f"{r.params:,}" if r.params else "-", f"{r.macs:,}" if r.macs else "-",
                f"{r.val_loss:.4f}" if r.val_loss is not None else r.status + (f": {r.detail}" if r.detail else ""),
            ))
        header = ("rank", "candidate", "θ (α|β|γ|δ|ε|φ|ρ)", "ω", "ψ", "ν", "width", "params", "MACs/token", "val loss")
        return f"budget: {self.budget_macs:,} MACs/token\n" + format_table(header, rows)

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """All rows, ranked, to ``path``."""
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_FIELDS)
            writer.writeheader()
            writer.writerows(r.to_csv() for r in self.ranked())


def _read_csv(path: Path, budget_macs: int) -> list[SearchRow]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(_FIELDS) <= set(reader.fieldnames):
            raise SearchError(f"{path}: not a search CSV (columns {reader.fieldnames}); choose another --output")
        rows = [SearchRow.from_csv(r) for r in reader]
    budgets = {r.budget_macs for r in rows}
    if budgets and budgets != {budget_macs}:
        raise SearchError(
            f"{path}: was written for a budget of {sorted(budgets)} MACs/token, this search has {budget_macs:,}; "
            "use the same budget to resume or another output file"
        )
    return rows


# ---- sizing ---------------------------------------------------------------------------------------------
def _structurable_macs(model: nn.Module, min_features: int) -> int:
    """MACs of the linear layers an ``all-linear`` rewrite targets (the output head excluded)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear) and m is not head and min(m.in_features, m.out_features) >= min_features)


def _size(task: SearchTask, cand: Candidate, budget: int, seed: int) -> tuple[nn.Module, int]:
    """The candidate's model within ``budget`` MACs/token, and its width; SearchError if none fits."""
    if not cand.is_fixed:  # registry structure: base width, the solver picks the hyper-parameters
        dense, _ = task.build(task.base_width, None, seed)
        fixed = task.macs(dense) - _structurable_macs(dense, task.min_features)
        allowance = budget - fixed
        for _ in range(2):  # a second try gives back what layers left dense (no cheaper fit) overspent
            if allowance < 1:
                break
            config = RewriteConfig(structure=cand.structure, budget=FlopBudget(macs_per_token=allowance),
                                   init="mup", min_features=task.min_features)
            model, _ = task.build(task.base_width, config, seed)
            over = task.macs(model) - budget
            if over <= 0:
                return model, task.base_width
            allowance -= over
        raise SearchError(
            f"{cand.label}: at width {task.base_width} the layers it cannot structure already cost "
            f"{fixed:,} of the {budget:,} MACs/token budget; raise the budget"
        )
    config = None if cand.is_dense else RewriteConfig(
        structure=cand.structure, budget=FlopBudget(ratio=1e6), init="mup", min_features=task.min_features
    )
    errors: list[str] = []

    def fitting(width: int) -> nn.Module | None:
        try:
            model, _ = task.build(width, config, seed)
        except EinrewriteError as e:
            errors.append(f"width {width}: {str(e).splitlines()[0]}")
            return None
        return model if task.macs(model) <= budget else None

    widths = sorted(set(task.widths))
    lo, hi, found = 0, len(widths) - 1, None
    while lo <= hi:  # fixed structure: the widest model within budget (MACs grow with width: bisect)
        mid = (lo + hi) // 2
        model = fitting(widths[mid])
        if model is not None:
            found, lo = (model, widths[mid]), mid + 1
        else:
            hi = mid - 1
    if found is not None:
        return found
    if errors:  # a width that failed to build (padding) may have hidden a smaller one that fits: scan
        failed = {e.split(":")[0] for e in errors}
        for width in reversed(widths):
            if f"width {width}" not in failed and (model := fitting(width)) is not None:
                return model, width
    why = f" (e.g. {errors[-1]})" if errors else ""
    raise SearchError(
        f"{cand.label}: no width in {min(task.widths)}..{max(task.widths)} fits {budget:,} MACs/token{why}"
    )


def _spec_of(model: nn.Module) -> Any:
    """The bound spec of the model's most expensive structured layer (None for a dense model)."""
    best, best_macs = None, -1
    for module in model.modules():
        spec = getattr(module, "spec", None)
        macs = getattr(module, "macs", None)
        if spec is not None and isinstance(macs, int) and macs > best_macs:
            best, best_macs = spec, macs
    return best


def _describe(cand: Candidate, model: nn.Module | None) -> tuple[str, str, dict[str, float]]:
    """(structure text, θ text, taxonomy values) of a candidate, from its θ or from its sized model."""
    if cand.theta is not None:
        t = cand.theta
        return "einsum", str(t), _taxonomy(t, t.omega, t.psi, t.nu)
    if cand.is_dense:
        dense = Theta(0, 0, 1, 0, 0, 1, 0)
        return "dense", str(dense), _taxonomy(dense, 0.0, 1.0, 1.0)
    if model is None:  # a registry structure that was not sized: its taxonomy depends on the sizes
        return str(cand.structure), "", {}
    spec = _spec_of(model)
    if spec is None:
        return str(cand.structure), "", {}
    theta = getattr(spec, "theta", None)
    text = spec.describe() if callable(getattr(spec, "describe", None)) else str(cand.structure)
    return text.split(" θ=")[0], "" if theta is None else str(theta), _taxonomy(theta, spec.omega, spec.psi, spec.nu)


# ---- the search -----------------------------------------------------------------------------------------
def search(
    task: SearchTask,
    candidates: Sequence[Candidate] | None = None,
    *,
    named: bool | Sequence[str] = True,
    paper: bool = True,
    samples: int = 0,
    where: str | None = None,
    flops_ratio: float = 0.5,
    macs_per_token: int | None = None,
    seed: int = 0,
    csv_path: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    on_row: Callable[[SearchRow], None] | None = None,
) -> SearchResult:
    """Size every candidate to one compute budget, train it briefly on ``task`` and rank by validation loss.

    Args:
        task: what to train (:class:`LMTask`, :class:`RegressionTask` or your own :class:`SearchTask`).
        candidates: an explicit list (default: :func:`make_candidates` with ``named``, ``paper``, ``samples``).
        named: registry structures to include (True: all but ``einsum``).
        paper: include the paper's θ list.
        samples: θ sampled uniformly from the canonical region.
        where: a taxonomy filter such as ``"omega == 0 and psi == 1"`` (see :func:`taxonomy_filter`); candidates
            that fail it are listed as ``filtered`` and not trained.
        flops_ratio: the budget as a fraction of the dense model's MACs/token at the base width.
        macs_per_token: the budget in MACs per token of the whole model (overrides ``flops_ratio``).
        seed: seeds initialisation, sampling and training data (the same for every candidate).
        csv_path: write rows here as they finish; an existing file is resumed (its candidates are not rerun).
        progress: a tqdm bar on stderr (None: when stderr is a terminal).
        on_row: called with each new row.

    Returns:
        A :class:`SearchResult`: ``.ranked()``, ``.best``, ``.table()``, ``.write_csv()``.

    Raises:
        SearchError: a bad filter or budget, or a CSV written for another budget.
    """
    keep = taxonomy_filter(where) if where else None
    if candidates is None:
        candidates = make_candidates(named=named, paper=paper, samples=samples, seed=seed)
    if macs_per_token is None:
        if not (flops_ratio > 0 and math.isfinite(flops_ratio)):
            raise SearchError(f"search: flops_ratio must be a number > 0, got {flops_ratio!r}")
        dense, _ = task.build(task.base_width, None, seed)
        macs_per_token = int(flops_ratio * task.macs(dense))
    if macs_per_token < 1:
        raise SearchError(f"search: the budget must be >= 1 MAC/token, got {macs_per_token}")
    done: dict[str, SearchRow] = {}
    path = Path(csv_path) if csv_path is not None else None
    if path is not None and path.exists() and path.stat().st_size > 0:
        done = {r.candidate: r for r in _read_csv(path, macs_per_token)}
    rows = [done[c.label] for c in candidates if c.label in done]
    todo = [c for c in candidates if c.label not in done]
    writer_file = None
    if path is not None:
        fresh = not path.exists() or path.stat().st_size == 0
        writer_file = open(path, "a", newline="")  # noqa: SIM115 - closed in the finally below
        writer = csv.DictWriter(writer_file, fieldnames=_FIELDS)
        if fresh:
            writer.writeheader()
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc=f"search ({task.name})", unit="cand", file=sys.stderr,
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    try:
        for cand in bar:
            bar.set_postfix_str(cand.label, refresh=False)
            row = _run_one(task, cand, macs_per_token, seed, keep)
            rows.append(row)
            if writer_file is not None:
                writer.writerow(row.to_csv())
                writer_file.flush()
            if on_row is not None:
                on_row(row)
            logger.info("search: %s -> %s", cand.label, row.val_loss if row.status == "ok" else row.status)
    finally:
        bar.close()
        if writer_file is not None:
            writer_file.close()
    return SearchResult(rows, macs_per_token, resumed=len(done))


def _run_one(task: SearchTask, cand: Candidate, budget: int, seed: int,
             keep: Callable[[dict[str, float]], bool] | None) -> SearchRow:
    start = time.perf_counter()
    base = {"candidate": cand.label, "source": cand.source, "budget_macs": budget}
    if keep is not None and (cand.theta is not None or cand.is_dense):  # θ known: decide before sizing
        structure, theta, values = _describe(cand, None)
        if not keep(values):
            return SearchRow(**base, structure=structure, theta=theta, omega=values["omega"], psi=values["psi"],
                             nu=values["nu"], width=None, params=None, macs=None, val_loss=None, status="filtered")
    try:
        model, width = _size(task, cand, budget, seed)
    except EinrewriteError as e:
        structure, theta, values = _describe(cand, None)
        return SearchRow(**base, structure=structure, theta=theta, omega=values.get("omega"), psi=values.get("psi"),
                         nu=values.get("nu"), width=None, params=None, macs=None, val_loss=None, status="skipped",
                         detail=str(e).splitlines()[0][:300], seconds=round(time.perf_counter() - start, 3))
    structure, theta, values = _describe(cand, model)
    info = {"structure": structure, "theta": theta, "omega": values.get("omega"), "psi": values.get("psi"),
            "nu": values.get("nu"), "width": width, "params": sum(p.numel() for p in model.parameters()),
            "macs": task.macs(model)}
    if keep is not None and not keep(values):
        return SearchRow(**base, **info, val_loss=None, status="filtered")
    try:
        loss = task.fit(model, seed)
    except EinrewriteError as e:
        return SearchRow(**base, **info, val_loss=None, status="skipped", detail=str(e).splitlines()[0][:300],
                         seconds=round(time.perf_counter() - start, 3))
    return SearchRow(**base, **info, val_loss=loss, status="ok", seconds=round(time.perf_counter() - start, 3))
