"""A small GPT (nanoGPT-shaped causal language model) whose linear layers are plain ``nn.Linear``.

Every projection (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``fc_in``, ``fc_out``) is its own ``nn.Linear``,
so :func:`einrewrite.rewrite` can structure each of them (the paper splits Q/K/V the same way, paper-notes §4.3).
The output head stays dense: :meth:`GPT.get_output_embeddings` tells ``"all-linear"`` targeting to leave it.

µP-friendly options (paper-notes §4.3), all on by default:

* attention logits scaled by ``√64 / d_head`` instead of ``1/√d_head`` (µP attention, equal to standard
  attention at d_head = 64);
* per-head LayerNorm on queries and keys (QK-LN);
* zero-initialised residual-output projections (``o_proj``, ``fc_out``) and output head;
* residual branches multiplied by ``√(3 / n_layer)``.

Examples:
    >>> model = GPT(GPTConfig(d_model=64, n_layer=2, block_size=32))
    >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EinrewriteError

__all__ = ["GPT", "GPTConfig", "ModelConfigError", "build_gpt", "zero_init_residual_outputs"]

_MUP_BASE_HEAD = 64


class ModelConfigError(EinrewriteError, ValueError):
    """A model configuration value is invalid."""


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes and options of :class:`GPT`.

    Args:
        vocab_size: number of token ids (256 for the byte corpus).
        block_size: longest context (positions learned).
        n_layer: transformer blocks.
        d_model: residual width; must be a multiple of ``d_head``.
        d_head: width of one attention head (``n_head = d_model // d_head``).
        ffn_mult: hidden width of the MLP as a multiple of ``d_model``.
        mup_attention: scale logits by ``8 / d_head`` (µP) instead of ``1/√d_head``.
        qk_norm: LayerNorm on each head's queries and keys.
        zero_init: zero-initialise ``o_proj``, ``fc_out`` and the output head.
        depth_scale: multiply residual branches by ``√(3 / n_layer)``.
        bias: biases in the linear layers.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 3
    d_model: int = 128
    d_head: int = 32
    ffn_mult: int = 4
    mup_attention: bool = True
    qk_norm: bool = True
    zero_init: bool = True
    depth_scale: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "d_model", "d_head", "ffn_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"GPTConfig.{name} must be an integer >= 1, got {value!r}")
        if self.d_model % self.d_head:
            raise ModelConfigError(
                f"GPTConfig.d_model = {self.d_model} is not a multiple of d_head = {self.d_head}; choose a width "
                f"such as {max(1, self.d_model // self.d_head) * self.d_head}"
            )

    @property
    def n_head(self) -> int:
        """Number of attention heads."""
        return self.d_model // self.d_head

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-able dict (``GPTConfig(**d)`` rebuilds it)."""
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate Q, K, V and output projections."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_head, self.d_head = config.n_head, config.d_head
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.k_proj = nn.Linear(d, d, bias=config.bias)
        self.v_proj = nn.Linear(d, d, bias=config.bias)
        self.o_proj = nn.Linear(d, d, bias=config.bias)
        self.q_norm = nn.LayerNorm(config.d_head, bias=config.bias) if config.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(config.d_head, bias=config.bias) if config.qk_norm else nn.Identity()
        self.scale = math.sqrt(_MUP_BASE_HEAD) / config.d_head if config.mup_attention else config.d_head**-0.5

    def forward(self, x: Tensor) -> Tensor:
        """Attention over the causal prefix of x (B, T, d)."""
        b, t, d = x.shape

        def heads(z: Tensor, norm: nn.Module) -> Tensor:
            # QK-LN before the transpose: its gradient then stays contiguous, which AOT-compiled backward
            # graphs of the structured projections expect
            z = norm(z.reshape(b, t, self.n_head, self.d_head))  # (B, T, H, d_head)
            return z.transpose(1, 2)  # (B, H, T, d_head)

        q = heads(self.q_proj(x), self.q_norm)
        k = heads(self.k_proj(x), self.k_norm)
        v = heads(self.v_proj(x), nn.Identity())
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, H, T, d_head)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class MLP(nn.Module):
    """Two-layer GELU MLP of hidden width ``ffn_mult · d_model``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.ffn_mult * config.d_model
        self.fc_in = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.fc_out = nn.Linear(hidden, config.d_model, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        """fc_out(gelu(fc_in(x)))."""
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)
        self.branch_scale = math.sqrt(3 / config.n_layer) if config.depth_scale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        """x + attn(ln(x)), then + mlp(ln(x)), each branch scaled."""
        x = x + self.branch_scale * self.attn(self.ln_1(x))
        return x + self.branch_scale * self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model: token + learned position embeddings, blocks, dense head.

    Args:
        config: sizes and options (default :class:`GPTConfig`).
    """

    #: Names (suffixes) of the layers that write into the residual stream; µP zero-initialises their last core.
    residual_outputs: tuple[str, ...] = ("o_proj", "fc_out")

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.gpt_config = config = config or GPTConfig()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings N(0, 0.02); linear layers N(0, 1/fan_in); residual outputs and head zero (if zero_init)."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, 0.02)
                elif isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5)
                    if module.bias is not None:
                        module.bias.zero_()
            if self.gpt_config.zero_init:
                self.lm_head.weight.zero_()
                for block in self.blocks:
                    block.attn.o_proj.weight.zero_()
                    block.mlp.fc_out.weight.zero_()

    def get_output_embeddings(self) -> nn.Module:
        """The output head (left dense by ``"all-linear"`` targeting, as PEFT does)."""
        return self.lm_head

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, T, vocab_size) for token ids (B, T)."""
        t = idx.shape[1]
        if t > self.gpt_config.block_size:
            raise ModelConfigError(
                f"GPT: sequence of {t} tokens is longer than block_size = {self.gpt_config.block_size}; "
                "crop the input or build the model with a larger block_size"
            )
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def attention_macs_per_token(self, context: int) -> int:
        """MACs per token of the attention scores and weighted sums at ``context`` (full, non-causal count).

        Per layer ``2 · context · d_model`` (QKᵀ and AV), as the paper counts SDPA (paper-notes §5.1).
        """
        return 2 * context * self.gpt_config.d_model * self.gpt_config.n_layer


def zero_init_residual_outputs(model: nn.Module, suffixes: tuple[str, ...] = GPT.residual_outputs) -> list[str]:
    """Zero the residual-output layers of a (possibly rewritten) model, as µP does (paper-notes §4.1).

    A dense ``nn.Linear`` gets a zero weight; a structured layer zeroes only its **last** core
    (``reset_parameters(zero_last=True)``), so the first core stays random and the last one receives gradient.
    Call it after :func:`einrewrite.rewrite` with ``init="mup"``.

    Returns:
        The names of the layers that were zeroed.
    """
    done: list[str] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not name or name.rsplit(".", 1)[-1] not in suffixes:
                continue
            if isinstance(module, nn.Linear):
                module.weight.zero_()
            elif callable(getattr(module, "reset_parameters", None)):
                try:
                    module.reset_parameters(zero_last=True)
                except TypeError:  # a structured module without the option: leave it as initialised
                    continue
            else:
                continue
            done.append(name)
    return done


def build_gpt(
    config: GPTConfig | None = None, rewrite_config: Any = None, *, seed: int = 0
) -> tuple[GPT, Any]:
    """A seeded :class:`GPT`, optionally rewritten with ``rewrite_config``, with µP zero-init applied after.

    The rewrite runs on a model with random (not zeroed) output projections and head, so that its liveness
    check can see every layer; the zero-init of ``config.zero_init`` is applied afterwards (the head and the
    last core of every residual-output layer).

    Args:
        config: the model's sizes and options.
        rewrite_config: an :class:`einrewrite.RewriteConfig` (use ``init="mup"`` to train from scratch), or None
            for the dense model.
        seed: seeds the initialisation (``torch.manual_seed``) and the example inputs.

    Returns:
        ``(model, report)``; ``report`` is None for the dense model.

    Examples:
        >>> import einrewrite as er
        >>> cfg = er.RewriteConfig(structure="btt", budget=er.FlopBudget(ratio=0.3), init="mup", min_features=1)
        >>> model, report = build_gpt(GPTConfig(d_model=64, n_layer=1, block_size=16), cfg)
        >>> len(report.replaced)
        6
    """
    from dataclasses import replace

    config = config or GPTConfig()
    torch.manual_seed(seed)
    model = GPT(replace(config, zero_init=False) if rewrite_config is not None else config)
    report = None
    if rewrite_config is not None:
        from .api import rewrite  # api imports the whole pipeline; keep gpt importable on its own

        idx = torch.randint(
            0, config.vocab_size, (2, min(8, config.block_size)), generator=torch.Generator().manual_seed(seed)
        )
        model, report = rewrite(model, rewrite_config, (idx,), progress=False)
        model.gpt_config = config
        if config.zero_init:
            with torch.no_grad():
                model.lm_head.weight.zero_()
            zero_init_residual_outputs(model)
    return model, report
