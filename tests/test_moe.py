"""BTTMoELinear and the btt_moe structure: the MoE identity, dispatch parity, losses, training, rewrite, export."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import einrewrite as er
from einrewrite import BTTMoE, BTTMoELinear, EinsumLinear, moe_aux_loss
from einrewrite.errors import StructureMismatchError
from einrewrite.moe import route
from einrewrite.structures.btt_moe import MoESpec

from models import moe_layer, tiny_gpt  # type: ignore[import-not-found]

SIZES = [(16, 16), (64, 32), (12, 36), (97, 97)]  # 97: both sides padded (input zero-padded, output cropped)


def _per_token_reference(layer: BTTMoELinear, x: Tensor) -> Tensor:
    """y_t = Σ_sel g_e · M_e x_t + b, one token and one expert at a time."""
    x2 = x.reshape(-1, layer.in_features)
    index, gates = route(layer.router(x2), layer.top_k)
    rows = []
    for t in range(x2.shape[0]):
        y = sum(gates[t, j] * (layer.expert_weight(int(index[t, j])) @ x2[t]) for j in range(layer.top_k))
        rows.append(y + (0 if layer.bias is None else layer.bias))
    return torch.stack(rows).reshape(*x.shape[:-1], layer.out_features)


# ---- the layer's function -------------------------------------------------------------------------------
@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
def test_experts_are_the_rank_slices_of_one_rank_e_btt(d_in: int, d_out: int) -> None:
    layer = moe_layer(d_in, d_out)
    btt = EinsumLinear(layer.spec.btt, bias=False)
    with torch.no_grad():
        for name, core in layer.btt_cores().items():
            getattr(btt, name).copy_(core)
    total = sum(layer.expert_weight(e) for e in range(layer.num_experts))
    torch.testing.assert_close(total, btt.to_dense(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
def test_gated_rank_e_btt_equals_sum_of_gated_rank1_experts(dispatch: str, d_in: int, d_out: int) -> None:
    layer = moe_layer(d_in, d_out)
    layer.dispatch = dispatch  # type: ignore[assignment]
    x = torch.randn(2, 5, d_in)
    torch.testing.assert_close(layer(x), _per_token_reference(layer, x), rtol=1e-5, atol=1e-5)


def _grads(layer: BTTMoELinear, x: Tensor, dispatch: str) -> tuple[Tensor, dict[str, Tensor]]:
    layer.dispatch = dispatch  # type: ignore[assignment]
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    g_out = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(y, [xg, *layer.parameters()], g_out)
    return y.detach(), {"x": grads[0], **dict(zip(names, grads[1:], strict=True))}


@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
def test_dense_and_sparse_dispatch_agree_in_outputs_and_gradients(d_in: int, d_out: int) -> None:
    layer = moe_layer(d_in, d_out, experts=8)
    x = torch.randn(3, 7, d_in)
    y_sparse, g_sparse = _grads(layer, x, "sparse")
    y_dense, g_dense = _grads(layer, x, "dense")
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-5, atol=1e-5)
    assert set(g_sparse) == {"x", "A", "B", "router.weight", "bias"}
    for name in g_sparse:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-5, atol=1e-5, msg=name)
        assert g_sparse[name].abs().sum() > 0, name  # gradients reach the router and the experts


def test_zero_init_ties_route_to_the_first_experts_on_both_paths() -> None:
    layer = BTTMoELinear(32, 32, num_experts=8, top_k=2, bias=False)  # router zero: every logit ties
    x = torch.randn(50, 32)
    index, gates = route(layer.router(x), 2)
    assert index.tolist() == [[0, 1]] * 50
    torch.testing.assert_close(gates, torch.full((50, 2), 0.5))
    y_sparse, g_sparse = _grads(layer, x, "sparse")
    y_dense, g_dense = _grads(layer, x, "dense")
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-5, atol=1e-5)
    expected = 0.5 * x @ (layer.expert_weight(0) + layer.expert_weight(1)).T
    torch.testing.assert_close(y_sparse, expected, rtol=1e-5, atol=1e-5)
    for name in g_sparse:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-5, atol=1e-5, msg=name)
    # experts 2..7 got no token: zero gradient on both paths, and the router still learns
    assert g_sparse["A"][2:].abs().max() == 0 and g_sparse["B"][2:].abs().max() == 0
    assert g_sparse["router.weight"].abs().sum() > 0


@pytest.mark.parametrize("tokens", [1, 3])
def test_empty_experts_and_tiny_batches(tokens: int) -> None:
    layer = moe_layer(16, 24, experts=8)  # 8 experts, at most 2·tokens used
    x = torch.randn(tokens, 16)
    y_sparse, g_sparse = _grads(layer, x, "sparse")
    y_dense, g_dense = _grads(layer, x, "dense")
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-5, atol=1e-5)
    for name in g_sparse:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-5, atol=1e-5, msg=name)


def test_empty_batch() -> None:
    layer = moe_layer(16, 16)
    assert layer(torch.randn(0, 16)).shape == (0, 16)


def test_wrong_width_names_the_layer() -> None:
    with pytest.raises(RuntimeError, match=r"BTTMoELinear\(btt_moe.*expects inputs with 16 features"):
        moe_layer(16, 16)(torch.randn(2, 15))


def test_bad_arguments_raise_with_the_fix() -> None:
    with pytest.raises(StructureMismatchError, match="top_k must be <= num_experts"):
        BTTMoELinear(16, 16, num_experts=2, top_k=3)
    with pytest.raises(StructureMismatchError, match="num_experts must be an integer >= 1"):
        BTTMoE(num_experts=0)
    with pytest.raises(StructureMismatchError, match="dispatch must be 'sparse' or 'dense'"):
        BTTMoELinear(16, 16, dispatch="loop")  # type: ignore[arg-type]


def test_float64_and_autocast() -> None:
    layer = moe_layer(32, 32).double()
    x = torch.randn(4, 32, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    layer = moe_layer(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 32))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# ---- counts, init, spec -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("d_in", "d_out"), SIZES)
def test_params_and_active_macs(d_in: int, d_out: int) -> None:
    layer = BTTMoELinear(d_in, d_out, num_experts=8, top_k=2, bias=True)
    counted = sum(p.numel() for n, p in layer.named_parameters() if n != "bias")
    assert layer.params == layer.spec.params == counted
    a, _, g, _, e, f, r = layer.spec.sizes
    assert r == 8 and g * a >= d_in and f * e >= d_out
    assert layer.macs == 2 * (g * a * f + f * g * e) + d_in * 8
    # each expert is a rank-1 BTT: the active MACs are k/E of the experts' total plus the router
    rank1 = er.structure("btt", d_in, d_out, rank=1)
    assert layer.spec.expert_macs == rank1.macs and layer.spec.expert_params == rank1.params


def test_spec_round_trip_and_report_fields() -> None:
    spec = BTTMoE(num_experts=16, top_k=2, in_split=1 / 3, out_split=2 / 3).bind(768, 3072)
    assert MoESpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.name == "btt_moe" and spec.psi == 1.0 and spec.dense_macs == 768 * 3072
    assert spec.hyper_dict["experts"] == 16 and spec.hyper_dict["active_macs"] == spec.macs
    assert "num_experts=16" in spec.describe() and f"{spec.macs:,}" in spec.describe()
    assert BTTMoE(**dict(spec.hyper)) == spec.structure()
    with pytest.raises(StructureMismatchError, match="not a valid btt_moe spec"):
        MoESpec.from_dict({"name": "btt_moe"})


def test_search_space_keeps_experts_and_binds() -> None:
    candidates = list(BTTMoE.search_space(48, 96))
    assert candidates and all((c.num_experts, c.top_k) == (8, 2) for c in candidates)
    assert all(c.bind(48, 96).macs < 48 * 96 for c in candidates)


def test_budget_sizes_the_experts_within_the_budget() -> None:
    for ratio in (0.1, 0.2, 0.4):
        choice = er.solve_layer(er.LayerRequest("fc", 1024, 1024, "btt_moe"), ratio)
        assert choice.spec is not None and choice.spec.macs <= ratio * 1024 * 1024
        assert (choice.spec.num_experts, choice.spec.top_k) == (8, 2)
    with pytest.raises(er.BudgetInfeasibleError, match="fc: btt_moe needs"):
        er.solve_layer(er.LayerRequest("fc", 1024, 1024, "btt_moe"), 0.001)


def test_budget_keeps_given_experts_and_sizes_the_blocks() -> None:
    sized = BTTMoE(num_experts=16, top_k=1)  # splits left to the budget
    assert sized.is_sized_by_budget
    chosen = {}
    for ratio in (0.05, 0.3):
        spec = er.solve_layer(er.LayerRequest("fc", 768, 768, sized), ratio).spec
        assert spec is not None and (spec.num_experts, spec.top_k) == (16, 1)
        assert spec.macs <= ratio * 768 * 768
        chosen[ratio] = spec
    assert chosen[0.05].macs < chosen[0.3].macs  # the blocks grow with the budget
    fixed = BTTMoE(num_experts=16, top_k=1, in_split=0.5, out_split=0.5)
    assert not fixed.is_sized_by_budget
    assert er.solve_layer(er.LayerRequest("fc", 768, 768, fixed), 0.3).spec == fixed.bind(768, 768)
    with pytest.raises(er.BudgetInfeasibleError, match="fc: btt_moe needs"):
        er.solve_layer(er.LayerRequest("fc", 768, 768, sized), 0.001)
    config = er.RewriteConfig(structure=sized, budget=er.FlopBudget(ratio=0.3))
    assert er.RewriteConfig.from_dict(json.loads(json.dumps(config.to_dict()))).structure == sized


def test_mup_init_as_if_rank_one() -> None:
    layer = BTTMoELinear(1024, 1024, num_experts=8)
    assert layer.router.weight.abs().max() == 0
    a, _, g, _, e, f, _ = layer.spec.sizes
    assert layer.A.std().item() == pytest.approx(er.mup_std(a, f), rel=0.02)
    assert layer.B.std().item() == pytest.approx(er.mup_std(g, e), rel=0.02)
    layer.reset_parameters(zero_last=True)
    assert layer.B.abs().max() == 0


def test_param_groups_cover_cores_and_router() -> None:
    model = nn.Sequential(BTTMoELinear(64, 64, num_experts=4), nn.Linear(64, 8))
    groups = er.param_groups(model, lr=1e-3, base_width=128)
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    assert set(lr_of) == {n for n, _ in model.named_parameters()}
    a, _, g, _, _, _, _ = model[0].spec.sizes
    assert lr_of["0.A"] == pytest.approx(1e-3 * 128 / (2 * a))
    assert lr_of["0.B"] == pytest.approx(1e-3 * 128 / (2 * g))
    assert lr_of["0.router.weight"] == pytest.approx(1e-3 * 128 / 64)  # dense µP, as the paper's router


def test_from_linear_projects_to_a_rank_e_btt() -> None:
    member = moe_layer(32, 48, experts=4, bias=True)
    dense = sum(member.expert_weight(e) for e in range(4)).detach()  # a rank-4 BTT: exact projection
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(dense)
    layer = BTTMoELinear.from_linear(linear, num_experts=4, top_k=2)
    assert layer.projection_error is not None and layer.projection_error < 1e-5
    total = sum(layer.expert_weight(e) for e in range(4))
    torch.testing.assert_close(total, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias, linear.bias)
    assert layer.router.weight.abs().max() == 0
    noisy = BTTMoELinear.from_linear(nn.Linear(32, 48), num_experts=4)
    assert noisy.projection_error is not None and 0 < noisy.projection_error < 1
    assert not hasattr(layer, "to_dense")  # input-dependent: no single weight


# ---- router losses and statistics -------------------------------------------------------------------------
def test_aux_loss_equals_a_hand_computation() -> None:
    layer = moe_layer(8, 8, experts=4, k=2, bias=False).train()
    x = torch.randn(6, 8)
    layer(x)
    logits = (x @ layer.router.weight.T).tolist()
    E, k = 4, 2
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    chosen = [sorted(range(E), key=lambda e, row=row: (-row[e], e))[:k] for row in logits]
    p = [sum(pr[e] for pr in probs) for e in range(E)]
    f = [sum(e in c for c in chosen) for e in range(E)]
    switch = E * sum(p[e] / sum(p) * f[e] / sum(f) for e in range(E))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / len(logits)
    assert layer.aux_loss is not None
    assert float(layer.aux_loss.detach()) == pytest.approx(switch + 0.1 * z, rel=1e-5)
    stats = layer.router_stats()
    assert stats["load"] == pytest.approx([fe / sum(f) for fe in f])
    entropy = [-sum(q * math.log(q) for q in pr) for pr in probs]
    assert stats["ppl"] == pytest.approx(sum(math.exp(h) for h in entropy) / len(entropy), rel=1e-5)
    mean = [sum(pr[e] for pr in probs) / len(probs) for e in range(E)]
    assert stats["agg_ppl"] == pytest.approx(math.exp(-sum(m * math.log(m) for m in mean)), rel=1e-5)
    layer.aux_loss.backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_moe_aux_loss_is_the_mean_over_layers_and_zero_in_eval() -> None:
    model = nn.Sequential(moe_layer(8, 8, seed=1), nn.ReLU(), moe_layer(8, 8, seed=2)).train()
    model(torch.randn(5, 8))
    expected = (model[0].aux_loss + model[2].aux_loss) / 2
    torch.testing.assert_close(moe_aux_loss(model), expected)
    copied = copy.deepcopy(model)  # the stored loss is a graph node: copies (export_onnx's) drop it
    assert copied[0].aux_loss is None and model[0].aux_loss is not None
    fresh = nn.Sequential(moe_layer(8, 8)).eval()
    fresh(torch.randn(5, 8))
    assert float(moe_aux_loss(fresh)) == 0.0 and fresh[0].router_stats() == {}


@pytest.fixture
def one_thread() -> object:
    """Many tiny ops: a second thread only adds synchronisation on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_training_spreads_the_load_across_experts() -> None:
    """A mixture-of-regressions task: 4 input clusters, each with its own linear map, 4 experts, k = 2."""
    torch.manual_seed(0)
    d, experts = 16, 4
    centers = torch.randn(experts, d) * 2
    maps = torch.randn(experts, d, d) / d**0.5
    model = nn.Sequential(nn.Linear(d, d), BTTMoELinear(d, d, num_experts=experts, top_k=2)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        cluster = torch.randint(0, experts, (64,))
        x = centers[cluster] + torch.randn(64, d)
        target = torch.einsum("noi,ni->no", maps[cluster], x)  # (64, d)
        loss = F.mse_loss(model(x), target) + 0.01 * moe_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = centers[torch.arange(512) % experts] + torch.randn(512, d)
    model(x)
    stats = model[1].router_stats()
    assert max(stats["load"]) <= 2 / experts, stats  # no expert above 2x its fair share
    assert min(stats["load"]) > 0, stats


@pytest.mark.slow  # dynamo tracing: about 10 s on the shared 2-core machine
@pytest.mark.usefixtures("one_thread")
def test_torch_compile_runs_the_layer() -> None:
    layer = moe_layer(32, 32, experts=4)
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(2, 6, 32, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.A.grad is not None and layer.router.weight.grad is not None
    torch.testing.assert_close(compiled(torch.randn(3, 32)).shape, torch.Size([3, 32]))


# ---- rewrite, save and load -------------------------------------------------------------------------------
def test_rewrite_turns_every_linear_of_a_tiny_gpt_into_btt_moe_but_the_tied_head(tmp_path: Path) -> None:
    model, inputs = tiny_gpt()
    config = er.RewriteConfig(structure="btt_moe", budget=er.FlopBudget(ratio=0.9), init="mup")
    new, report = er.rewrite(model, config, example_inputs=inputs)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    replaced = {d.fqn for d in report.replaced}
    assert replaced == set(linears) - {"lm_head"}
    assert all(isinstance(new.get_submodule(n), BTTMoELinear) for n in replaced)
    head = next(d for d in report.decisions if d.fqn == "lm_head")
    assert head.reason == "tied_weight"
    for d in report.replaced:
        assert d.structure == "btt_moe" and d.hyper is not None and d.hyper["experts"] == 8
        assert d.macs_after == d.hyper["active_macs"] <= 0.9 * d.macs_before
    assert "active_macs" in report.table()
    y = new(*inputs)
    assert y.shape == model(*inputs).shape and torch.isfinite(y).all()

    new.train()
    new(*inputs).sum().backward()
    assert float(moe_aux_loss(new).detach()) > 0
    new.eval()
    with torch.no_grad():  # spread the routing so the reload is checked on a non-trivial router
        for m in new.modules():
            if isinstance(m, BTTMoELinear):
                m.router.weight.normal_()
    out = er.save_pretrained(new, tmp_path / "moe", report)
    base, _ = tiny_gpt()
    reloaded = er.load_pretrained(out, base_model=base).eval()
    torch.testing.assert_close(reloaded(*inputs), new(*inputs))
    assert isinstance(reloaded.get_submodule(linears[0]), BTTMoELinear)
