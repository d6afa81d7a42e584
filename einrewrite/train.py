"""Train a causal language model and log validation loss against training compute (paper-notes §5).

The loop is the paper's GPT recipe at toy scale: AdamW with structure-aware learning rates
(:func:`einrewrite.param_groups`), linear warmup then a **constant** learning rate (so every evaluation is a
valid point on the compute frontier), gradient clipping, and the BTT-MoE load-balancing loss added with weight
0.01 when the model has MoE layers.

Compute is accounted analytically, never by a tracer: each structured layer reports its own ``.macs`` (active
experts only for MoE), other ``nn.Linear`` layers and the output head count ``d_in · d_out``, attention counts
``2 · context · d_model`` per layer and token. Training compute after ``n`` tokens is ``6 · MACs/token · n``
FLOPs (forward + backward, 2 FLOPs per MAC).

Distributed data parallel: when ``torch.distributed`` is initialised (``torchrun``; gloo on CPU) the model is
wrapped in ``DistributedDataParallel``. Every process draws the same global batch from the same generator and
trains on its own slice, so ``k`` processes with ``grad_accum=a`` follow exactly the run of one process with
``grad_accum=k·a`` on the same global batch. The script owns the process group; end it with ``dist.barrier()``
before ``dist.destroy_process_group()`` when one rank has more to do (saving), or gloo may abort the rank
that exits first.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Corpus
from .errors import EinrewriteError
from .init import param_groups

__all__ = [
    "EvalPoint",
    "MacsBreakdown",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "TrainingDivergedError",
    "active_macs_per_token",
    "evaluate",
    "train",
]

logger = logging.getLogger(__name__)

FLOPS_PER_MAC_TRAIN = 6  # forward (2 FLOPs per MAC) + backward (twice the forward)
AUX_LOSS_WEIGHT = 0.01


class TrainConfigError(EinrewriteError, ValueError):
    """A training setting is invalid (the message names the field, the value and what is allowed)."""


class TrainingDivergedError(EinrewriteError, FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of :func:`train`.

    Args:
        steps: optimizer steps.
        batch_size: sequences per step, summed over all processes and accumulation micro-batches.
        block_size: context length of a training sequence.
        lr: the base learning rate η (per-group rates come from :func:`einrewrite.param_groups`).
        base_width: µP base width w: a dense matrix gets η·w/fan_in, a structured core η·w/(n_cores·fan_in);
            None uses each layer's own input width (dense layers then keep η).
        warmup: linear warmup steps; the rate is constant afterwards.
        grad_clip: clip the global gradient norm to this (0 disables).
        weight_decay: AdamW decay of matrices (vectors never decay).
        betas: AdamW betas.
        aux_loss_weight: weight of the MoE load-balancing loss (paper: 0.01).
        grad_accum: micro-batches per step and process.
        eval_every: evaluate every this many steps (ignored when ``eval_points`` > 0).
        eval_points: if > 0, evaluate at this many log-spaced steps (good for compute frontiers).
        eval_batches: validation batches per evaluation (a fixed set, the same at every evaluation).
        eval_batch_size: sequences per validation batch (default: ``batch_size``).
        seed: seeds the training batches.
        compile: ``torch.compile`` the training model: False, True (default backend) or a backend name.
        checkpoint_every: save a checkpoint every this many steps (0: only at the end, if ``out_dir`` is set).
        log_every: log the training loss every this many steps (0: never).
    """

    steps: int = 200
    batch_size: int = 32
    block_size: int = 128
    lr: float = 3e-3
    base_width: int | None = None
    warmup: int = 20
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    aux_loss_weight: float = AUX_LOSS_WEIGHT
    grad_accum: int = 1
    eval_every: int = 50
    eval_points: int = 0
    eval_batches: int = 8
    eval_batch_size: int | None = None
    seed: int = 0
    compile: bool | str = False
    checkpoint_every: int = 0
    log_every: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "grad_accum", "eval_batches", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainConfigError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("warmup", "eval_points", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TrainConfigError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainConfigError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.aux_loss_weight < 0:
            raise TrainConfigError(
                f"TrainConfig: grad_clip, weight_decay and aux_loss_weight must be >= 0, got {self.grad_clip}, "
                f"{self.weight_decay}, {self.aux_loss_weight}"
            )
        if self.base_width is not None and self.base_width < 1:
            raise TrainConfigError(f"TrainConfig.base_width must be None or >= 1, got {self.base_width!r}")

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step (all processes together)."""
        return self.batch_size * self.block_size

    def eval_steps(self) -> list[int]:
        """The steps after which the model is evaluated (always including 0 and the last step)."""
        if self.eval_points > 0:
            grid = {round(math.exp(x)) for x in _linspace(0.0, math.log(self.steps), self.eval_points)}
        else:
            grid = set(range(self.eval_every, self.steps + 1, self.eval_every))
        return sorted({0, self.steps} | {s for s in grid if 0 < s <= self.steps})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _linspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]


# ---- compute accounting ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MacsBreakdown:
    """Forward multiply-accumulates per token of a model, by kind.

    Attributes:
        structured: einsum / MoE layers (their analytic ``.macs``; active experts only).
        dense_linear: ``nn.Linear`` layers other than the output head.
        head: the output head.
        attention: attention scores and weighted sums (``2 · context · d_model`` per layer).
    """

    structured: int
    dense_linear: int
    head: int
    attention: int

    @property
    def total(self) -> int:
        """All MACs per token."""
        return self.structured + self.dense_linear + self.head + self.attention

    @property
    def linear(self) -> int:
        """MACs per token of the linear layers that a rewrite may structure (head and attention excluded)."""
        return self.structured + self.dense_linear


def active_macs_per_token(model: nn.Module, context: int) -> MacsBreakdown:
    """Analytic forward MACs per token of ``model`` with sequences of ``context`` tokens.

    A module with an integer ``macs`` attribute (``EinsumLinear``, ``BTTMoELinear``) counts that and its children
    are not visited (a router inside an MoE layer is part of its ``.macs``); ``nn.Linear`` counts
    ``in · out``; the module returned by ``get_output_embeddings()`` is the head; a model with
    ``attention_macs_per_token(context)`` adds its attention.

    Examples:
        >>> from einrewrite.gpt import GPT, GPTConfig
        >>> m = active_macs_per_token(GPT(GPTConfig(d_model=64, n_layer=1)), context=128)
        >>> m.dense_linear, m.head, m.attention
        (49152, 16384, 16384)
    """
    model = _unwrap(model)
    head_module = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        head_module = get_head()
    structured = dense = head = 0
    counted: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in counted):
            continue
        macs = getattr(module, "macs", None)
        if isinstance(macs, int) and not isinstance(module, nn.Linear):
            structured += macs
            counted.append(name)
        elif isinstance(module, nn.Linear):
            if module is head_module:
                head += module.in_features * module.out_features
            else:
                dense += module.in_features * module.out_features
    attention_fn = getattr(model, "attention_macs_per_token", None)
    attention = int(attention_fn(context)) if callable(attention_fn) else 0
    return MacsBreakdown(structured, dense, head, attention)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model


# ---- the loop ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPoint:
    """One evaluation: after ``step`` steps, ``tokens`` training tokens and ``compute`` training FLOPs."""

    step: int
    tokens: int
    compute: float
    val_loss: float
    train_loss: float | None
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """What :func:`train` returns: the evaluations and the model's compute accounting."""

    history: list[EvalPoint]
    macs: MacsBreakdown
    params: int
    config: TrainConfig
    seconds: float
    checkpoints: list[str] = field(default_factory=list)

    @property
    def final_val_loss(self) -> float:
        """Validation loss at the last evaluation."""
        return self.history[-1].val_loss

    @property
    def best_val_loss(self) -> float:
        """Lowest validation loss seen."""
        return min(p.val_loss for p in self.history)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {
            "history": [dataclasses.asdict(p) for p in self.history],
            "macs_per_token": dataclasses.asdict(self.macs) | {"total": self.macs.total},
            "params": self.params,
            "config": self.config.to_dict(),
            "seconds": self.seconds,
            "checkpoints": self.checkpoints,
        }

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """The history as CSV (step, tokens, compute, val_loss, train_loss, lr, seconds)."""
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(EvalPoint)])
            writer.writeheader()
            writer.writerows(dataclasses.asdict(p) for p in self.history)


def _aux_loss_fn() -> Callable[[nn.Module], Tensor | float | None] | None:
    """``einrewrite.moe_aux_loss`` when the MoE module exists (it is optional for this loop)."""
    try:
        from . import moe  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(moe, "moe_aux_loss", None)


def _has_moe(model: nn.Module) -> bool:
    try:
        from .moe import BTTMoELinear  # type: ignore[attr-defined]
    except ImportError:
        return False
    return any(isinstance(m, BTTMoELinear) for m in model.modules())


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))  # (B·T, V) vs (B·T,)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], *, rank: int = 0, world: int = 1
) -> float:
    """Mean cross-entropy (nats/token) of ``model`` on ``batches``; shared across processes when ``world > 1``."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        if i % world != rank:
            continue
        logits = model(x.to(device))
        total[0] += float(_lm_loss(logits, y.to(device))) * y.numel()
        total[1] += y.numel()
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return factor


def _save(model: nn.Module, out_dir: Path, step: int, report: Any, history: list[EvalPoint]) -> str:
    """A checkpoint directory: ``save_pretrained`` when the model was rewritten, else weights + JSON."""
    path = out_dir / f"step_{step:06d}"
    report = report if report is not None else getattr(model, "einrewrite_report", None)
    if report is not None:
        from .api import save_pretrained

        save_pretrained(model, path, report, overwrite=True)
    else:
        import safetensors.torch

        path.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_model(model, str(path / "model.safetensors"))
    with open(path / "train_history.json", "w") as f:
        json.dump([dataclasses.asdict(p) for p in history], f, indent=1)
    return str(path)


def train(
    model: nn.Module,
    corpus: Corpus,
    config: TrainConfig | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    report: Any = None,
    on_eval: Callable[[EvalPoint], None] | None = None,
) -> TrainResult:
    """Train ``model`` (token ids (B, T) -> logits (B, T, V)) on ``corpus`` and return its loss-vs-compute history.

    The model is trained in place (its parameters are updated); under ``torch.distributed`` every process
    calls this with the same model and config.

    Args:
        model: a causal language model, e.g. :class:`einrewrite.gpt.GPT` (dense or rewritten).
        corpus: train/validation token streams (:func:`einrewrite.data.load_corpus`).
        config: the settings (default :class:`TrainConfig`).
        out_dir: where checkpoints (``save_pretrained`` directories) and ``history.csv`` go (rank 0 only).
        report: the model's :class:`~einrewrite.RewriteReport` for checkpoints (default: ``model.einrewrite_report``).
        on_eval: called with every :class:`EvalPoint` (rank 0 only).

    Raises:
        TrainConfigError: the batch does not split over processes and micro-batches, or the context is too long.

    Examples:
        >>> from einrewrite.data import load_corpus
        >>> from einrewrite.gpt import GPT, GPTConfig
        >>> corpus = load_corpus(max_bytes=100_000)
        >>> cfg = TrainConfig(steps=2, batch_size=2, block_size=16, warmup=1, eval_every=2, eval_batches=1)
        >>> result = train(GPT(GPTConfig(d_model=32, n_layer=1, block_size=16)), corpus, cfg)
        >>> [p.step for p in result.history]
        [0, 2]
    """
    config = config or TrainConfig()
    start = time.perf_counter()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    rank = torch.distributed.get_rank() if distributed else 0
    micro_total = world * config.grad_accum
    if config.batch_size % micro_total:
        raise TrainConfigError(
            f"TrainConfig.batch_size = {config.batch_size} does not split into {world} processes x "
            f"{config.grad_accum} micro-batches; use a multiple of {micro_total}"
        )
    micro = config.batch_size // micro_total
    raw = _unwrap(model)
    max_context = getattr(getattr(raw, "gpt_config", None), "block_size", None)
    if max_context is not None and config.block_size > max_context:
        raise TrainConfigError(
            f"TrainConfig.block_size = {config.block_size} exceeds the model's block_size = {max_context}; "
            "lower it or build a model with a longer context"
        )
    device = next(raw.parameters()).device
    raw.train()
    macs = active_macs_per_token(raw, config.block_size)
    params = sum(p.numel() for p in raw.parameters())
    groups = param_groups(raw, config.lr, base_width=config.base_width, weight_decay=config.weight_decay)
    for group in groups:
        group.pop("param_names", None)
        group["initial_lr"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    step_model: nn.Module = raw
    if distributed:
        step_model = nn.parallel.DistributedDataParallel(raw)
    if config.compile:
        backend = config.compile if isinstance(config.compile, str) else "inductor"
        step_model = torch.compile(step_model, backend=backend)  # type: ignore[assignment]
    aux_fn = _aux_loss_fn() if config.aux_loss_weight > 0 and _has_moe(raw) else None
    generator = torch.Generator().manual_seed(config.seed)
    eval_set = corpus.eval_batches("val", config.eval_batches, config.eval_batch_size or config.batch_size,
                                   config.block_size, seed=10_000 + config.seed)
    eval_at = set(config.eval_steps())
    history: list[EvalPoint] = []
    checkpoints: list[str] = []
    out = Path(out_dir) if out_dir is not None and rank == 0 else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    train_loss: float | None = None
    lr_factor = 0.0

    def record(step: int) -> None:
        val = evaluate(raw, eval_set, rank=rank, world=world)
        tokens = step * config.tokens_per_step
        point = EvalPoint(step, tokens, float(FLOPS_PER_MAC_TRAIN * macs.total * tokens), val, train_loss,
                          lr_factor * config.lr, round(time.perf_counter() - start, 3))
        history.append(point)
        if rank == 0:
            logger.info("step %d: val %.4f train %s compute %.3g FLOPs", step, val,
                        "-" if train_loss is None else f"{train_loss:.4f}", point.compute)
            if on_eval is not None:
                on_eval(point)

    record(0)
    for step in range(1, config.steps + 1):
        lr_factor = _set_lr(optimizer, min(1.0, step / config.warmup) if config.warmup else 1.0)
        x_all, y_all = corpus.batch("train", config.batch_size, config.block_size, generator)  # (B, T) each
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64)
        for m in range(config.grad_accum):
            lo = (rank * config.grad_accum + m) * micro  # this process's m-th slice of the global batch
            x, y = x_all[lo : lo + micro].to(device), y_all[lo : lo + micro].to(device)
            sync = m == config.grad_accum - 1
            context = step_model.no_sync() if distributed and not sync else _null()  # type: ignore[operator]
            with context:
                loss = _lm_loss(step_model(x), y)
                total = loss
                if aux_fn is not None:
                    aux = aux_fn(raw)
                    if aux is not None:
                        total = total + config.aux_loss_weight * aux
                (total / config.grad_accum).backward()
            step_loss += float(loss.detach()) / config.grad_accum
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw.parameters(), config.grad_clip)
        optimizer.step()
        if distributed:
            torch.distributed.all_reduce(step_loss)
            step_loss /= world
        train_loss = float(step_loss)
        if not math.isfinite(train_loss):
            raise TrainingDivergedError(
                f"training loss is {train_loss} at step {step}; lower TrainConfig.lr (now {config.lr}) or raise "
                f"TrainConfig.warmup (now {config.warmup})"
            )
        if config.log_every and step % config.log_every == 0 and rank == 0:
            logger.info("step %d: train loss %.4f", step, train_loss)
        if step in eval_at:
            record(step)
        if out is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoints.append(_save(raw, out, step, report, history))
    if out is not None:
        if not checkpoints or not checkpoints[-1].endswith(f"step_{config.steps:06d}"):
            checkpoints.append(_save(raw, out, config.steps, report, history))
    result = TrainResult(history, macs, params, config, round(time.perf_counter() - start, 3), checkpoints)
    if out is not None:
        result.write_csv(out / "history.csv")
        with open(out / "train_result.json", "w") as f:
            json.dump(result.to_dict(), f, indent=1)
    return result


class _null:
    """A do-nothing context manager (``contextlib.nullcontext`` without the generic type noise)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
