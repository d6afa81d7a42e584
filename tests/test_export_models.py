"""ONNX export of rewritten Hugging Face models (GPT-2, Llama, BERT, ViT, Mixtral; built offline from configs).

Each model is rewritten with BTT and a second structure (per-layer overrides), BTT-MoE inside GPT-2, then
exported once: no ``Einsum`` node, ONNX Runtime matches PyTorch, and the graph runs at batch and sequence
lengths other than the export's (ViT: other batch sizes). Mixtral's fused experts stay dense and export through
transformers' ``grouped_mm_fallback`` op (:mod:`einrewrite.external_ops`). One export per model keeps the file
fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

from einrewrite import (
    BTTMoELinear,
    EinsumLinear,
    ExportError,
    ExportReport,
    FlopBudget,
    LayerOverride,
    RewriteConfig,
    export_onnx,
    rewrite,
)
from einrewrite import export as export_module
from einrewrite.export import onnxruntime_session

import models  # type: ignore[import-not-found]  # tests/models.py: tiny HF models, offline

_ONE_LAYER = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 64, "intermediate_size": 128,
              "vocab_size": 128}


def _gpt2() -> nn.Module:
    """GPT2LMHeadModel, one block: Conv1D layers (weights stored (in, out)), lm_head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=128, n_positions=64)).eval()


def _llama() -> nn.Module:
    """LlamaForCausalLM, one block, grouped-query attention, RoPE, SwiGLU MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_ONE_LAYER, num_key_value_heads=1)).eval()


def _bert() -> nn.Module:
    """BertModel, one block, with the pooler."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**_ONE_LAYER, max_position_embeddings=64)).eval()


def _vit() -> nn.Module:
    """ViTForImageClassification, one block: a patch Conv2d, the classifier head."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = {k: v for k, v in _ONE_LAYER.items() if k != "vocab_size"}
    return ViTForImageClassification(ViTConfig(**config, image_size=32, patch_size=8, num_labels=10)).eval()


def _mixtral() -> nn.Module:
    """MixtralForCausalLM, one block: a router and fused 3-D expert tensors (4 experts, top 2)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**_ONE_LAYER, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2)).eval()


def _inputs(name: str, batch: int, seq: int) -> dict[str, Any]:
    if name == "vit":  # images: only the batch varies
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seq))}
    ids = models.token_ids(batch, seq)
    return {**ids, "use_cache": False} if name == "gpt2" else ids  # the others: export_onnx adds it


CASES: dict[str, tuple[Callable[[], nn.Module], RewriteConfig, dict[str, str]]] = {
    # model -> (factory, config, {fqn: structure expected after the rewrite, or "skipped: <reason>"})
    "gpt2": (
        _gpt2,
        RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.5),
                      overrides={"mlp.c_fc": LayerOverride(structure="btt_moe")}),
        {"transformer.h.0.attn.c_attn": "btt", "transformer.h.0.mlp.c_fc": "btt_moe",
         "transformer.h.0.mlp.c_proj": "btt"},
    ),
    "llama": (
        _llama,
        RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.5),
                      overrides={"self_attn.o_proj": LayerOverride(structure="low_rank")}),
        {"model.layers.0.mlp.up_proj": "btt", "model.layers.0.self_attn.o_proj": "low_rank"},
    ),
    "bert": (
        _bert,
        RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.5),
                      overrides={"intermediate.dense": LayerOverride(structure="monarch")}),
        {"encoder.layer.0.attention.self.query": "btt", "encoder.layer.0.intermediate.dense": "monarch"},
    ),
    "vit": (
        _vit,
        RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.5),
                      overrides={"mlp.fc2": LayerOverride(structure="kronecker")}),
        {"vit.layers.0.attention.q_proj": "btt", "vit.layers.0.mlp.fc2": "kronecker",
         "classifier": "skipped: output_head"},
    ),
    "mixtral": (
        _mixtral,
        RewriteConfig(structure="btt", budget=FlopBudget(ratio=0.5)),
        {"model.layers.0.self_attn.q_proj": "btt", "model.layers.0.mlp.experts.gate_up_proj": "skipped: fused_experts",
         "model.layers.0.mlp.experts.down_proj": "skipped: fused_experts"},
    ),
}


def _ops(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}


def _first_output(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewritten_model_exports_without_einsum_and_runs_at_other_shapes(name: str, tmp_path: Path) -> None:
    _rewrite_export_and_run(name, tmp_path)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_at_opset_23_attention_is_one_onnx_op_and_the_model_runs(name: str, tmp_path: Path) -> None:
    """GPT-2 carries a BTT-MoE layer (an ``If`` of two groupings), Llama rotary embeddings: onnxscript's opset-23
    RotaryEmbedding fusion gave them caches that ONNX Runtime rejects when the model runs."""
    result, path = _rewrite_export_and_run(name, tmp_path, opset=23)
    assert result.opset == 23
    assert "Attention" in _ops(path) and "RotaryEmbedding" not in _ops(path)


def _rewrite_export_and_run(name: str, tmp_path: Path, opset: int | None = None) -> tuple[ExportReport, Path]:
    """Rewrite ``CASES[name]``, check the decisions, export (parity checked), and run the file at other shapes."""
    factory, config, expected = CASES[name]
    new, report = rewrite(factory(), config, _inputs(name, 2, 8))
    for fqn, want in expected.items():
        decision = report[fqn]
        got = decision.structure if decision.status == "replaced" else f"skipped: {decision.reason}"
        assert got == want, report.table()
    if "btt_moe" in expected.values():
        assert any(isinstance(m, BTTMoELinear) for m in new.modules())
    assert sum(isinstance(m, EinsumLinear) for m in new.modules()) >= 2

    path = tmp_path / f"{name}.onnx"
    result = export_onnx(new, (), path, example_kwargs=_inputs(name, 2, 8), opset=opset)
    assert result.checked and result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert "Einsum" not in _ops(path) and not result.einsum_nodes
    # models that take use_cache, given none, export without a KV cache, as the report says (ViT takes none)
    assert result.inputs_added == ({"use_cache": False} if name in ("bert", "llama", "mixtral") else {})
    assert ("use_cache=False added" in result.summary()) == bool(result.inputs_added)
    if "btt_moe" in expected.values():  # sparse routing: only the selected experts run
        assert result.op_counts["NonZero"] >= 8 and "Gather" in result.op_counts
        # combined by gathers and adds, not by a racy ScatterND(add) or ScatterElements(add)
        proto = onnx.load(str(path), load_external_data=False)
        reductions = [a.s for n in proto.graph.node if n.op_type in ("ScatterND", "ScatterElements")
                      for a in n.attribute if a.name == "reduction"]
        assert all(r in (b"", b"none") for r in reductions)

    session = onnxruntime_session(path)
    names = [i.name for i in session.get_inputs()]
    for batch, seq in [(3, 13), (1, 5)]:  # the export used (2, 8)
        inputs = _inputs(name, batch, seq)
        got = torch.from_numpy(session.run(None, {n: inputs[n].numpy() for n in names})[0])
        with torch.no_grad():
            want = _first_output(new(**inputs))
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    return result, path


def test_a_rewritten_model_whose_export_fails_names_the_op_and_layer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    new, _ = rewrite(model, RewriteConfig(structure="btt"), torch.randn(2, 64))
    new[1] = models.Untranslatable()  # an op the ONNX exporter cannot translate, between two structured layers
    with pytest.raises(ExportError, match=r"failed at op einrewrite_test[.:]+mystery\S* in layer '1'"):
        export_onnx(new, (torch.randn(2, 64),), tmp_path / "bad.onnx")


@pytest.mark.gpu
def test_rewritten_gpt2_on_the_cuda_provider_in_float16(tmp_path: Path) -> None:
    factory, config, _ = CASES["gpt2"]
    new, _ = rewrite(factory(), config, _inputs("gpt2", 2, 8))
    result = export_onnx(new, (), tmp_path / "gpt2_fp16.onnx", example_kwargs=_inputs("gpt2", 2, 8),
                         dtype="float16", providers="cuda")
    assert result.checked and result.providers_used[0] == "CUDAExecutionProvider"
    assert "Einsum" not in result.op_counts


def test_strided_example_inputs_export(tmp_path: Path) -> None:
    """A slice of a batch (a non-contiguous view) is a valid example input; torch.export's guards reject it."""
    model = nn.Sequential(nn.Embedding(128, 64), nn.Linear(64, 64))
    new, _ = rewrite(model, RewriteConfig(structure="btt"), torch.randint(0, 128, (2, 8)))
    ids = torch.randint(0, 128, (4, 32))[:2, :8]
    assert not ids.is_contiguous()
    report = export_onnx(new, (ids,), tmp_path / "strided.onnx")
    assert report.checked


def test_rewritten_bert_exported_from_one_sentence_keeps_the_batch_dynamic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captured with sizes of 1 kept dynamic (the capture from the example doubled skipped): BERT's pooler feeds
    its dense layer a strided slice (``hidden[:, 0]``); reshaping it asks torch.export whether a view would do, a
    guard that fixed a batch of one in the graph."""
    monkeypatch.setattr(export_module, "_pytorch_runs", lambda *args: False)  # as if PyTorch failed doubled
    factory, config, _ = CASES["bert"]
    new, _ = rewrite(factory(), config, _inputs("bert", 2, 8))
    report = export_onnx(new, (), tmp_path / "bert1.onnx", example_kwargs=_inputs("bert", 1, 8))
    assert report.fixed_sizes == [] and report.checked_shapes == [[1, 8], [2, 8]]


def test_rewritten_gpt2_exported_from_one_token_keeps_batch_and_sequence_dynamic(tmp_path: Path) -> None:
    """GPT-2's attention holds a 1 in the graph captured with sizes of 1 kept dynamic; the capture from the example
    doubled does not, and the model runs at one token and at others."""
    factory, config, _ = CASES["gpt2"]
    new, _ = rewrite(factory(), config, _inputs("gpt2", 2, 8))
    report = export_onnx(new, (), tmp_path / "gpt2_1.onnx", example_kwargs=_inputs("gpt2", 1, 1))
    assert report.fixed_sizes == [] and report.doubled_sizes == ["input_ids axis 0", "input_ids axis 1"]
    assert report.checked_shapes == [[2, 2], [1, 1]]
    session = onnxruntime_session(tmp_path / "gpt2_1.onnx")
    inputs = _inputs("gpt2", 3, 7)
    (got, *_) = session.run(None, {session.get_inputs()[0].name: inputs["input_ids"].numpy()})
    with torch.no_grad():
        expected = _first_output(new(**inputs))
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def test_a_decoder_asked_for_its_kv_cache_fails_with_a_way_out(tmp_path: Path) -> None:
    """torch.export cannot return transformers' cache object: given ``use_cache=True`` explicitly, the error says
    what to pass instead (given nothing, export_onnx passes it, as the test above shows)."""
    with pytest.raises(ExportError, match=r"LlamaForCausalLM.*Cache.*exports with use_cache=False in example_kwargs"):
        export_onnx(models.tiny_llama(), (), tmp_path / "cache.onnx",
                    example_kwargs={**models.token_ids(2, 8), "use_cache": True})
