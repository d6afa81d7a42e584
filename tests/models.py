"""Tiny models for the rewrite tests, built offline from config objects (nothing downloads).

Hugging Face models follow ecosystem-notes §5: GPT-2 (Conv1D, tied lm_head), BERT, Llama, ViT and Mixtral
(fused 3-D experts, a router). Hand-written ones cover ``F.linear`` in forward (the graph path), odd sizes
(768 and a prime), a low-rank weight a structure can represent exactly, and the demo's tiny GPT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from einrewrite.moe import BTTMoELinear

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # examples/ is importable as a package from the project root
    sys.path.insert(0, str(ROOT))

_SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, "intermediate_size": 128,
          "vocab_size": 128}


def tiny_gpt2() -> nn.Module:
    """GPT2LMHeadModel: 8 Conv1D (weight stored (in, out)) and an lm_head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert() -> nn.Module:
    """BertModel: 13 nn.Linear (including the pooler)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**_SMALL, max_position_embeddings=64)).eval()


def tiny_llama() -> nn.Module:
    """LlamaForCausalLM with grouped-query attention (k/v 64->32) and an untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_SMALL, num_key_value_heads=1)).eval()


def tiny_vit() -> nn.Module:
    """ViTForImageClassification: 13 nn.Linear (the 64->10 classifier among them) and a patch Conv2d."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(**{k: v for k, v in _SMALL.items() if k != "vocab_size"}, image_size=32, patch_size=8,
                       num_labels=10)
    return ViTForImageClassification(config).eval()


def tiny_mixtral() -> nn.Module:
    """MixtralForCausalLM: attention Linears, a router per layer and fused 3-D expert tensors."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(**_SMALL, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(config).eval()


def token_ids(batch: int = 2, seq: int = 8, vocab: int = 128) -> dict[str, Any]:
    """Keyword example inputs for a causal LM."""
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))}


class FunctionalBlock(nn.Module):
    """Linear ops on bare parameters, as research code writes them: ``F.linear(x, w, b)`` and ``x @ v.T``."""

    def __init__(self, d: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(hidden, d) / d**0.5)  # (out, in), used as F.linear(x, w, b)
        self.b = nn.Parameter(torch.randn(hidden) * 0.1)
        self.v = nn.Parameter(torch.randn(d, hidden) / hidden**0.5)  # (out, in), used as x @ v.T
        self.scale = nn.Parameter(torch.ones(d))  # 1-D: never a candidate

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(F.linear(x, self.w, self.b))  # (..., hidden)
        return x + (h @ self.v.T) * self.scale  # (..., d)


class FunctionalModel(nn.Module):
    """Two functional blocks and an ``nn.Linear`` head: the graph path's test model."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([FunctionalBlock(d), FunctionalBlock(d)])
        self.head = nn.Linear(d, 24)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class OddSizes(nn.Module):
    """A 768 -> 101 (prime) -> 768 bottleneck and a 768 -> 768 layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Linear(768, 101)
        self.up = nn.Linear(101, 768)
        self.mix = nn.Linear(768, 768, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(x + self.up(F.relu(self.down(x))))


def low_rank_mlp(rank: int = 2, d: int = 64, hidden: int = 96) -> nn.Sequential:
    """An MLP whose weights have rank ``rank``: a low_rank layer of that rank or more represents them exactly."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):
            o, i = layer.weight.shape
            layer.weight.copy_(torch.randn(o, rank) @ torch.randn(rank, i) / i**0.5)
    return mlp


def moe_layer(
    d_in: int, d_out: int, *, experts: int = 4, k: int = 2, bias: bool = True, seed: int = 0, **splits: float
) -> BTTMoELinear:
    """A BTTMoELinear with a router that spreads tokens, stage-2 cores of scale 0.3 and a random bias."""
    torch.manual_seed(seed)
    layer = BTTMoELinear(d_in, d_out, num_experts=experts, top_k=k, bias=bias, **splits)
    with torch.no_grad():
        layer.router.weight.normal_()  # a router that actually spreads tokens
        layer.B.normal_(0.0, 0.3)
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def tiny_gpt() -> tuple[nn.Module, tuple[Tensor]]:
    """The demo's nanoGPT-shaped model (examples/tiny_gpt.py) and its example inputs."""
    from examples.tiny_gpt import build

    return build(n_layer=2, n_embd=64, n_head=2, vocab_size=128)


@torch.library.custom_op("einrewrite_test::mystery", mutates_args=())
def _mystery(x: Tensor) -> Tensor:
    return x * 2


@_mystery.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


class Untranslatable(nn.Module):
    """A module whose op (``einrewrite_test::mystery``) the ONNX exporter cannot translate."""

    def forward(self, x: Tensor) -> Tensor:
        return _mystery(x)
