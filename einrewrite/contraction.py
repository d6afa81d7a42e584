"""How a structured layer's contraction runs: the one place that talks to opt_einsum.

Every non-dense layer computes ``y[n,φ,ε,δ] = Σ B[φ,ε,γ,ρ,β] · A[γ,ρ,φ,δ,α] · x[n,γ,β,α]`` (``spec.EQUATION``)
as two pairwise contractions, the input meeting one core first (``"xA"`` or ``"xB"``; weights-first orders
are excluded because they rebuild the dense matrix). Each contraction is lowered to one ``torch.bmm`` on
reshaped and permuted *views*, with letter orders chosen so that activations are never copied: the time of
these small batched GEMMs goes into moving activations, not into arithmetic (performance-notes.md).

* The BTT family (β = δ = 1: Monarch, BTT, low rank) works feature-major: the input is read in place as a
  batch of (α, N) blocks, the intermediate is (γ, ρφ, N) and the output (φ, ε, N) is returned as a
  transposed (N, d_out) view. A hand-written backward keeps the same layouts (autograd's would copy the
  intermediate's gradient when ρ > 1). Without gradients the same code runs as plain tensor ops, so
  ``torch.export`` and ONNX see only MatMul / Reshape / Transpose.
* Every other θ (Kronecker, tensor-train, generic points) runs a program found by a small search over bmm
  lowerings (which letters form the batch, which operand is on the left, the order of the weight's letters):
  the cheapest by FLOPs plus copied elements, where weights may be re-arranged (a copy the size of a core)
  but activations should not be.

Plans are cached per spec, per token bucket (the token count rounded up to a power of two) and per input
layout (token-major ``(N, d)`` or feature-major, as a structured layer's output is).

Letters follow ``spec.EQUATION = "ngba,grfda,fegrb->nfed"``: n tokens, a α, b β, g γ, d δ, e ε, f φ, r ρ.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import opt_einsum
import torch
from torch import Tensor

from .spec import EinsumSpec

__all__ = ["ContractionPlan", "btt_forward", "plan_contraction", "run", "token_bucket"]

InputLayout = Literal["token", "feature"]

# Activation-first pairwise orders of "x, A, B" as opt_einsum paths.
_ORDERS = {"xA": [(0, 1), (0, 1)], "xB": [(0, 2), (0, 1)]}
_X, _A, _B, _Y = "ngba", "grfda", "fegrb", "nfed"  # operand letters of spec.EQUATION
_GREEK = {"n": "N", "a": "α", "b": "β", "g": "γ", "d": "δ", "e": "ε", "f": "φ", "r": "ρ"}
# Time of moving one activation element, in FLOPs of the small batched GEMMs (60-100 GFLOP/s on the 2-core
# reference machine): a copy that a reshape cannot avoid is a transposition, 5-9 ms for 4M floats, about 100
# FLOPs per element; summing a batch of weight gradients streams contiguously, about 20.
_FLOPS_PER_COPIED_ELEMENT = 100
_FLOPS_PER_REDUCED_ELEMENT = 20
# An activation that is the right-hand GEMM operand with its summed letters contiguous is packed by MKL as a
# column-major matrix: 0.85 ms more for 4M floats with 32 summed letters (Kronecker), 10 ms with 1024.
_FLOPS_PER_PACKED_ELEMENT = 20
# Fixed cost of one GEMM of a batch (call and packing), in FLOP equivalents: per-token GEMMs of 32x32 blocks
# run as fast as one large GEMM, per-token GEMMs of 4x4 blocks do not.
_FLOPS_PER_GEMM = 4096
# Token bucket of the plan used under torch.compile, which cannot re-plan per call.
_COMPILE_TOKENS = 4096


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens``: plans are cached per bucket.

    Examples:
        >>> token_bucket(1), token_bucket(5), token_bucket(4096)
        (1, 8, 4096)
    """
    return 1 << max(0, int(tokens) - 1).bit_length()


# ---- the plan --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stage:
    """One pairwise contraction lowered to ``torch.bmm``; every field but the flags holds letters.

    The activation is permuted to ``batch + act_free + contract`` and reshaped to a (bt, rows, cols)
    matrix batch; the weight is permuted (and, for batch letters it lacks, broadcast) to match; the product
    is the contiguous tensor whose dimensions are ``out``.
    """

    weight: str  # "A" or "B"
    weight_letters: str  # the core's non-unit letters, in parameter order
    batch: str
    act_free: str
    contract: str
    weight_free: str
    act_left: bool  # bmm(act, w) when True, else bmm(w, actᵀ)
    act_copied: bool  # the activation's reshape copies it (no copy-free view exists)
    weight_copied: int  # elements of the re-arranged weight, 0 when it is a view of the parameter
    out: str

    def describe(self) -> str:
        """``[γ](ε×γρ)·(γρ×δN)``-style text: batch, then the two matrices in bmm order."""

        def g(letters: str) -> str:
            return "".join(_GREEK[c] for c in letters) or "1"

        act = (
            f"({g(self.act_free)}×{g(self.contract)})" if self.act_left else f"({g(self.contract)}×{g(self.act_free)})"
        )
        w = f"{self.weight}({g(self.contract)}×{g(self.weight_free)})" if self.act_left else (
            f"{self.weight}({g(self.weight_free)}×{g(self.contract)})"
        )
        body = f"{act}·{w}" if self.act_left else f"{w}·{act}"
        copied = " [copies activation]" if self.act_copied else ""
        return f"[{g(self.batch)}]{body}{copied}"


@dataclass(frozen=True)
class ContractionPlan:
    """The chosen execution of one layer at one token bucket.

    Attributes:
        kind: ``"dense"`` (one matmul), ``"bmm"`` (BTT family, feature-major with a hand-written backward) or
            ``"matmul"`` (any other θ: a searched program of two bmm calls).
        order: which core the input meets first, ``"xA"`` or ``"xB"``.
        steps: the two pairwise contractions as einsum strings, in execution order.
        cost: opt_einsum's FLOP count of the chosen order, per token (forward).
        tokens: the token bucket the plan was made for.
        layout: the input layout the plan was made for, ``"token"`` or ``"feature"``.
        grad: whether the plan was chosen for forward + backward (else forward only).
        copied_per_token: activation elements copied per token, forward plus backward if ``grad``.
        reduced_per_token: elements per token of weight-gradient batches that autograd sums (``grad`` only).
        weight_copied: elements of re-arranged weights (and summed weight gradients) per call.
        stages: the bmm lowering of each step (``"matmul"`` plans; the BTT kernel is fixed).
        out_layout: layout of the returned (N, d_out) tensor, ``"token"`` or ``"feature"``.
        optimal: opt_einsum's unrestricted optimal path at this token count, for the record.
        compile_stages: the stages used under ``torch.compile``, which cannot re-plan per call: those of a
            large token bucket (forward-only and training plans, in that order). No stages means the BTT
            kernel.
    """

    kind: str
    order: str
    steps: tuple[str, ...]
    cost: int
    tokens: int = 1
    layout: str = "token"
    grad: bool = False
    copied_per_token: int = 0
    reduced_per_token: int = 0
    weight_copied: int = 0
    stages: tuple[_Stage, ...] = ()
    out_layout: str = "token"
    optimal: str = ""
    compile_stages: tuple[tuple[_Stage, ...], tuple[_Stage, ...]] = ((), ())

    @property
    def total_cost(self) -> int:
        """Forward FLOPs of one call at the planned token bucket plus data movement at its FLOP equivalent."""
        moved = _FLOPS_PER_COPIED_ELEMENT * self.copied_per_token + _FLOPS_PER_REDUCED_ELEMENT * self.reduced_per_token
        return self.tokens * (self.cost + moved) + _FLOPS_PER_COPIED_ELEMENT * self.weight_copied

    def describe(self) -> str:
        """One line for reports: the kind, the order and the lowering of each step, and the cost.

        Examples:
            >>> from einrewrite import structure
            >>> plan_contraction(structure("monarch", 1024, 1024), 4096).describe()
            'bmm xA feature-major: [γ]A(ρφ×α)·(α×N) ; [φ]B(ε×γρ)·(γρ×N) | 131,072 FLOPs/token, 0 copied/token'
        """
        if self.kind == "dense":
            return f"dense x@Wᵀ | {self.cost:,} FLOPs/token"
        if self.kind == "bmm":
            body = "[γ]A(ρφ×α)·(α×N) ; [φ]B(ε×γρ)·(γρ×N)"
            return f"bmm {self.order} feature-major: {body} | {self.cost:,} FLOPs/token, 0 copied/token"
        body = " ; ".join(s.describe() for s in self.stages)
        text = (
            f"matmul {self.order} {self.out_layout}-major out: {body} | {self.cost:,} FLOPs/token, "
            f"{self.copied_per_token:,} copied/token"
        )
        return text + (f", {self.weight_copied:,} weight elements re-arranged" if self.weight_copied else "")


def plan_contraction(
    spec: EinsumSpec, tokens: int = 1, *, layout: InputLayout = "token", grad: bool = False
) -> ContractionPlan:
    """Choose how ``spec`` runs on ``tokens`` input rows; cached per (spec, token bucket, layout, grad).

    opt_einsum prices both activation-first orders on the real shapes (token count included); each is lowered
    to batched matmuls, searching for letter orders that copy no activation (forward, and with ``grad`` also
    autograd's backward, given a row-major output gradient), and the cheaper program wins.

    Args:
        spec: the bound structure.
        tokens: number of input rows (rounded up to a power of two for caching).
        layout: ``"token"`` for a row-major (N, d_in) input, ``"feature"`` for its transpose seen as (N, d_in).
        grad: plan for forward + backward instead of forward only.

    Returns:
        The plan; ``plan.describe()`` is one line for reports.

    Examples:
        >>> from einrewrite import structure
        >>> plan = plan_contraction(structure("kronecker", 1024, 1024), 4096)
        >>> plan.kind, plan.order, plan.copied_per_token
        ('matmul', 'xA', 0)
    """
    return _plan(spec, token_bucket(tokens), layout, grad)


@functools.lru_cache(maxsize=4096)
def _plan(spec: EinsumSpec, tokens: int, layout: str, grad: bool) -> ContractionPlan:
    if spec.is_dense:
        return ContractionPlan("dense", "x@W.T", (spec.equation,), 2 * spec.macs, tokens, layout, grad)
    order, steps, cost, program, optimal = _choose(spec, tokens, layout, grad)
    kind = "matmul" if program.stages else "bmm"
    compile_stages = (
        _choose(spec, _COMPILE_TOKENS, "token", False)[3].stages,
        _choose(spec, _COMPILE_TOKENS, "token", True)[3].stages,
    )
    return ContractionPlan(
        kind, order, steps, cost, tokens, layout, grad, program.copied, program.reduced, program.weight_copied,
        program.stages,
        program.out_layout, optimal, compile_stages,
    )


@functools.lru_cache(maxsize=4096)
def _choose(spec: EinsumSpec, tokens: int, layout: str, grad: bool) -> tuple[str, tuple[str, str], int, _Program, str]:
    """(order, steps, forward FLOPs per token, program, opt_einsum's optimal path) of the cheapest order."""
    shapes = _operand_shapes(spec, tokens)
    _, best_info = opt_einsum.contract_path(spec.equation, *shapes, shapes=True, optimize="optimal")
    optimal = " ; ".join(entry[2] for entry in best_info.contraction_list)
    size = _sizes(spec, tokens)
    choices = []
    for order, path in _ORDERS.items():
        _, info = opt_einsum.contract_path(spec.equation, *shapes, shapes=True, optimize=path)
        steps = _steps_in_operand_order(spec.equation, order, [entry[2] for entry in info.contraction_list])
        flops = int(info.opt_cost)
        program = _lower(order, layout, size, grad)
        choices.append(((3 if grad else 1) * flops + program.penalty, order, steps, flops // tokens, program))
        if spec.is_btt and order == "xA":
            # The fixed feature-major kernel: no copies forward or backward; a token-major input is read as
            # a column-major GEMM operand (the same pricing as in _lower). Preferred on ties.
            packed = tokens * spec.sizes.in_size if layout == "token" else 0
            gemms = (3 if grad else 1) * (spec.sizes.gamma + spec.sizes.phi)
            penalty = _FLOPS_PER_PACKED_ELEMENT * packed + _FLOPS_PER_GEMM * gemms
            kernel = _Program(penalty, 0, 0, 0, (), "feature")
            choices.append(((3 if grad else 1) * flops + penalty - 0.5, order, steps, flops // tokens, kernel))
    _, order, steps, cost, program = min(choices, key=lambda c: (c[0], c[1]))
    return order, steps, cost, program, optimal


def _steps_in_operand_order(equation: str, order: str, steps: list[str]) -> tuple[str, str]:
    """Rewrite opt_einsum's two step strings as "x,first->z" and "z,second->y"."""
    x_term, a_term, b_term = equation.split("->")[0].split(",")
    first, second = (a_term, b_term) if order == "xA" else (b_term, a_term)
    z_term = steps[0].split("->")[1]
    out = equation.split("->")[1]
    return (f"{x_term},{first}->{z_term}", f"{z_term},{second}->{out}")


def _operand_shapes(spec: EinsumSpec, tokens: int) -> list[tuple[int, ...]]:
    a, b, g, _, _, _, _ = spec.sizes
    return [(tokens, g, b, a), spec.core_shapes["A"], spec.core_shapes["B"]]


def _sizes(spec: EinsumSpec, tokens: int) -> dict[str, int]:
    a, b, g, d, e, f, r = spec.sizes
    return {"n": tokens, "a": a, "b": b, "g": g, "d": d, "e": e, "f": f, "r": r}


# ---- lowering a pairwise contraction to bmm (planning time: pure index arithmetic) ------------------------
@dataclass(frozen=True)
class _Dims:
    """A tensor whose dimensions are einsum letters: their order, sizes and strides (in elements)."""

    letters: str
    sizes: tuple[int, ...]
    strides: tuple[int, ...]

    @classmethod
    def contiguous(cls, letters: str, size: Mapping[str, int]) -> _Dims:
        sizes = tuple(size[c] for c in letters)
        strides = [1] * len(sizes)
        for i in range(len(sizes) - 2, -1, -1):
            strides[i] = strides[i + 1] * sizes[i + 1]
        return cls(letters, sizes, tuple(strides))

    def size(self, letter: str) -> int:
        return self.sizes[self.letters.index(letter)]

    def stride(self, letter: str) -> int:
        return self.strides[self.letters.index(letter)]


def _merge(dims: _Dims, order: str) -> tuple[int, int] | None:
    """(size, stride) of ``order``'s letters seen as one dimension, or None if that needs a copy.

    Broadcast letters have stride 0 and merge with each other (a weight shared over a batch of tokens).
    """
    live = [c for c in order if dims.size(c) != 1]
    if not live:
        return 1, 1
    for outer, inner in itertools.pairwise(live):
        if dims.stride(outer) != dims.size(inner) * dims.stride(inner):
            return None
    return math.prod(dims.size(c) for c in live), dims.stride(live[-1])


def _by_stride(dims: _Dims, letters: Iterable[str]) -> str:
    """Letters outermost first: the only order in which they can merge into one dimension."""
    return "".join(sorted(letters, key=lambda c: (-dims.stride(c), dims.letters.index(c))))


def _blas_ok(rows: tuple[int, int], cols: tuple[int, int]) -> bool:
    """BLAS reads a matrix in place when one stride is 1 (torch's test in ``bmm_out_or_baddbmm_``)."""
    (r_size, r_stride), (c_size, c_stride) = rows, cols
    if r_size == 1 or c_size == 1:
        return True
    return (c_stride == 1 and r_stride >= c_size) or (r_stride == 1 and c_stride >= r_size)


def _prod(size: Mapping[str, int], letters: str) -> int:
    return math.prod(size[c] for c in letters)


def _weight_copy(w: _Dims, target: str, rows: str, cols: str, size: Mapping[str, int]) -> int:
    """Elements materialized to present weight ``w`` as (batch, rows, cols) in letter order ``target``.

    Batch letters the weight lacks are broadcast with stride 0: free when every batch letter is broadcast
    (bmm reads a batch stride of 0), a copy otherwise (the batch letters cannot merge).
    """
    strides = tuple(w.stride(c) if c in w.letters else 0 for c in target)
    view = _Dims(target, tuple(size[c] for c in target), strides)
    batch = target[: len(target) - len(rows) - len(cols)]
    merged = [_merge(view, group) for group in (batch, rows, cols)]
    if merged[0] is None or merged[1] is None or merged[2] is None or not _blas_ok(merged[1], merged[2]):
        return _prod(size, target)
    return 0


def _stage_options(
    act: _Dims, weight: str, w_letters: str, keep: str, size: Mapping[str, int]
) -> Iterator[tuple[int, int, _Stage, _Dims]]:
    """Every bmm lowering of ``act`` × weight: (elements copied per token, packed per token, stage, result).

    "Packed" counts an activation that is the right-hand GEMM operand with its summed letters contiguous:
    MKL then packs it as a column-major matrix, slower than the same product with the activation on the
    left (x·Aᵀ against A·xᵀ for a rank-32 factor of a 1024-wide layer: 2.5 ms against 12.9 ms).
    """
    w = _Dims.contiguous(w_letters, size)
    shared = [c for c in act.letters if c in w_letters]
    batch_letters = [c for c in shared if c in keep]
    contract_letters = [c for c in shared if c not in keep]
    free_letters = [c for c in act.letters if c not in w_letters]
    w_free_letters = [c for c in w_letters if c not in act.letters]
    per_token = math.prod(act.sizes) // size["n"]
    # Free letters of the activation may join the batch (the weight is then broadcast over them); with n
    # that makes one small GEMM per token, which MKL's batched GEMM runs well for blocks of 16 and more.
    for k in range(len(free_letters) + 1):
        for extra in itertools.combinations(free_letters, k):
            for copied in (False, True):
                if copied and extra:
                    continue
                held = act
                if copied:  # the activation is first copied into (batch, free, contract) order
                    held = _Dims.contiguous("".join(batch_letters + free_letters + contract_letters), size)
                batch = _by_stride(held, [*batch_letters, *extra])
                free = _by_stride(held, [c for c in free_letters if c not in extra])
                contract = _by_stride(held, contract_letters)
                merged = [_merge(held, group) for group in (batch, free, contract)]
                if merged[0] is None or merged[1] is None or merged[2] is None or not _blas_ok(merged[1], merged[2]):
                    continue
                for w_free in itertools.permutations(w_free_letters):
                    wf = "".join(w_free)
                    for act_left in (True, False):
                        rows, cols = (contract, wf) if act_left else (wf, contract)
                        w_copied = _weight_copy(w, batch + rows + cols, rows, cols, size)
                        out = batch + (free + wf if act_left else wf + free)
                        stage = _Stage(weight, w_letters, batch, free, contract, wf, act_left, copied, w_copied, out)
                        packed = per_token if not act_left and merged[2][1] == 1 and merged[2][0] > 1 else 0
                        yield (per_token if copied else 0), packed, stage, _Dims.contiguous(out, size)


@dataclass(frozen=True)
class _Program:
    """A lowering with its price: ``penalty`` is in FLOP equivalents, added to the contraction's FLOPs."""

    penalty: float
    copied: int  # activation elements copied per token
    reduced: int  # elements per token of weight-gradient batches summed by autograd
    weight_copied: int
    stages: tuple[_Stage, ...]
    out_layout: str


def _backward_copies(stages: tuple[_Stage, ...], size: Mapping[str, int], x_letters: str) -> tuple[int, int, int]:
    """(copied per token, reduced per token, per call) elements autograd moves in the backward of ``stages``.

    The output gradient is taken row-major (N, d_out), as most consumers return it. Walking the stages
    backwards: the gradient of a stage's output is reshaped to the bmm result (a copy unless its letter groups
    merge), the activation's gradient comes out contiguous in the bmm operand's order, and a weight broadcast
    over batch letters gets a batch of gradients that autograd then sums.
    """
    y_letters = "".join(c for c in _Y if c == "n" or size[c] > 1)
    grad = _Dims.contiguous(y_letters, size)
    per_token = reduced = per_call = 0
    for stage in reversed(stages):
        rows, cols = (stage.act_free, stage.weight_free) if stage.act_left else (stage.weight_free, stage.act_free)
        merged = [_merge(grad, group) for group in (stage.batch, rows, cols)]
        if merged[0] is None or merged[1] is None or merged[2] is None or not _blas_ok(merged[1], merged[2]):
            per_token += _prod(size, stage.out) // size["n"]
        broadcast = [c for c in stage.batch if c not in stage.weight_letters]
        if broadcast:  # autograd sums the batch of weight gradients over the broadcast letters
            numel = _prod(size, stage.batch + stage.contract + stage.weight_free)
            if "n" in broadcast:
                reduced += numel // size["n"]
            else:
                per_call += numel
        held = stage.batch + (stage.act_free + stage.contract if stage.act_left else stage.contract + stage.act_free)
        grad = _Dims.contiguous(held, size)
    if _merge(grad, x_letters[1:]) is None:  # the (N, d_in) gradient is a copy
        per_token += _prod(size, x_letters[1:])
    return per_token, reduced, per_call


def _lower(order: str, layout: str, size: Mapping[str, int], grad: bool) -> _Program:
    """The cheapest two-stage bmm program for ``order`` on an input of ``layout``."""

    def live(letters: str) -> str:
        return "".join(c for c in letters if c == "n" or size[c] > 1)

    x_letters = live(_X)
    if layout == "feature":  # (N, d_in) seen transposed: n has unit stride
        feat = _Dims.contiguous(x_letters[1:] + "n", size)
        x = _Dims(x_letters, tuple(size[c] for c in x_letters), tuple(feat.stride(c) for c in x_letters))
    else:
        x = _Dims.contiguous(x_letters, size)
    first, second = (("A", _A), ("B", _B)) if order == "xA" else (("B", _B), ("A", _A))
    z_keep = "".join(c for c in "ngbafedr" if c in _X + first[1] and c in second[1] + _Y)
    y_features = live(_Y)[1:]
    best: tuple[tuple[float, int, int], _Program] | None = None
    for copied1, packed1, stage1, z in _stage_options(x, first[0], live(first[1]), live(z_keep), size):
        for copied2, packed2, stage2, y in _stage_options(z, second[0], live(second[1]), live(_Y), size):
            flat = _merge(y, y_features) is not None
            copied = copied1 + copied2 + (0 if flat else _prod(size, y_features))
            w_copied = stage1.weight_copied + stage2.weight_copied
            gemms = _prod(size, stage1.batch) + _prod(size, stage2.batch)
            reduced = 0
            if grad:
                bwd_token, reduced, bwd_call = _backward_copies((stage1, stage2), size, x_letters)
                copied, w_copied, gemms = copied + bwd_token, w_copied + bwd_call, 3 * gemms
            penalty = (
                _FLOPS_PER_COPIED_ELEMENT * (size["n"] * copied + w_copied)
                + _FLOPS_PER_PACKED_ELEMENT * size["n"] * (packed1 + packed2)
                + _FLOPS_PER_REDUCED_ELEMENT * size["n"] * reduced
                + _FLOPS_PER_GEMM * gemms
            )
            feature_out = y.stride("n") == 1 and size["n"] > 1
            key = (penalty, 0 if feature_out else 1, len(stage1.batch) + len(stage2.batch))
            if best is None or key < best[0]:
                out_layout = "feature" if feature_out else "token"
                program = _Program(penalty, copied, reduced, w_copied, (stage1, stage2), out_layout)
                best = (key, program)
    assert best is not None  # the copying options always apply
    return best[1]


# ---- execution ---------------------------------------------------------------------------------------------
def run(
    spec: EinsumSpec, plan: ContractionPlan, x: Tensor, cores: Mapping[str, Tensor], bias: Tensor | None = None
) -> Tensor:
    """Apply the structured weight (and ``bias``) to ``x`` of shape (N, d_in); returns (N, d_out).

    The result may be a strided view (feature-major: ``y.t()`` is contiguous); the next layer reads it in
    place. ``plan`` is the layer's plan; a plan for ``x``'s token bucket and layout replaces it when they
    differ (cached; under ``torch.compile`` the given plan is used as is).

    Args:
        spec: the bound structure.
        plan: a plan for ``spec``, from :func:`plan_contraction`.
        x: the input, (N, d_in), token-major or feature-major (other strides are copied first).
        cores: the parameters by name, as in ``spec.core_shapes``.
        bias: optional (d_out,) bias added to the result.

    Returns:
        (N, d_out) tensor.

    Examples:
        >>> import torch
        >>> from einrewrite import EinsumLinear, structure
        >>> layer = EinsumLinear(structure("kronecker", 64, 64))
        >>> y = run(layer.spec, layer.plan, torch.randn(5, 64), layer.cores())
        >>> y.shape
        torch.Size([5, 64])
    """
    n = x.shape[0]
    if plan.kind == "dense":
        w = cores["weight"]
        return x @ w.t() if bias is None else torch.addmm(bias, x, w.t())  # (N, d_out)
    layout = _layout_of(x)
    if layout is None:
        x, layout = x.contiguous(), "token"  # (N, d_in): arbitrary strides are copied once
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(c.requires_grad for c in cores.values()))
    pad = spec.sizes.in_size - spec.d_in
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))  # (N, in_size): padded features are zeros
    if torch.compiler.is_compiling():  # no re-planning inside a traced graph
        stages = plan.compile_stages[1 if needs_grad else 0]
    elif (plan.tokens, plan.layout, plan.grad) == (token_bucket(n), layout, needs_grad):
        stages = plan.stages
    else:
        stages = plan_contraction(spec, n, layout=layout, grad=needs_grad).stages
    if stages:  # a searched program
        y = _run_program(stages, x, cores, _sizes(spec, n))  # (N, out_size)
    elif needs_grad:  # the BTT kernel
        y = _BTT.apply(x, cores["A"], cores["B"], tuple(spec.sizes))  # (N, φε) view
    else:  # inference: the bias rides in the second matmul, saving a pass over the output
        y = btt_forward(x, cores["A"], cores["B"], spec, bias=bias)  # (N, φε) view
        bias = None
    if spec.sizes.out_size != spec.d_out:
        y = y[:, : spec.d_out]  # (N, d_out) view
    return y if bias is None else y + bias


def _layout_of(x: Tensor) -> InputLayout | None:
    """"token" for a row-major (N, d) tensor, "feature" for the transpose of a row-major (d, N) one."""
    n, d = x.shape
    if x.is_contiguous():
        return "token"
    if x.t().is_contiguous():
        return "feature"
    if n == 1 or d == 1:
        return "token"
    return None


def btt_forward(x: Tensor, A: Tensor, B: Tensor, spec: EinsumSpec, bias: Tensor | None = None) -> Tensor:
    """Two batched matmuls in feature-major layout; x: (N, γα) -> (N, φε) as a transposed view.

    Every operand is read in place: BLAS accepts a matrix whose rows or columns have unit stride, so the
    permuted views below cost no copies. The result is the (φ, ε, N) product seen as (N, φε).

    A ``bias`` is folded into the second matmul: the intermediate gets one more γ slot filled with ones
    (N·ρφ values) and the second core one more column holding the bias, so no separate pass over the
    (N, φε) output adds it (at d=1024, 4096 tokens that pass is about a sixth of the layer's time).

    Args:
        x: (N, γα) input, token-major or feature-major.
        A: (γ, ρ, φ, 1, α) core.
        B: (φ, ε, γ, ρ, 1) core.
        spec: a spec with β = δ = 1.
        bias: optional (d_out,) bias, d_out <= φε (padded outputs get zero).

    Returns:
        (N, φε) view of a contiguous (φ, ε, N) tensor.
    """
    a, _, g, _, e, f, r = spec.sizes
    n = x.shape[0]
    xt = x.reshape(n, g, a).permute(1, 2, 0)  # (γ, α, N) view
    a_rows = A.reshape(g, r * f, a)  # (γ, ρφ, α)
    b_rows = B.reshape(f, e, g, r)  # (φ, ε, γ, ρ)
    if bias is None:
        z = torch.bmm(a_rows, xt)  # (γ, ρφ, N)
    else:
        z = x.new_empty(g + 1, r * f, n)  # (γ+1, ρφ, N): slot γ holds ones
        torch.bmm(a_rows, xt, out=z[:g])  # (γ, ρφ, N) into the leading slots
        z[g].fill_(1.0)
        column = torch.zeros(f * e, 1, r, dtype=B.dtype, device=B.device)  # (φε, 1, ρ)
        column[: bias.shape[0], 0, 0] = bias.to(B.dtype)  # bias on ρ = 0 of the extra slot
        b_rows = torch.cat([b_rows, column.reshape(f, e, 1, r)], dim=2)  # (φ, ε, γ+1, ρ)
        g += 1
    zt = z.reshape(g * r, f, n).transpose(0, 1)  # (φ, γρ, N) view
    y = torch.bmm(b_rows.reshape(f, e, g * r), zt)  # (φ, ε, N)
    return y.reshape(f * e, n).t()  # (N, φε) view


class _BTT(torch.autograd.Function):
    """BTT forward (:func:`btt_forward`) with a backward that keeps every activation gradient copy-free.

    Autograd's own backward would reshape the intermediate's gradient from (φ, γρ, N) to (γ, ρφ, N), a
    copy when ρ > 1. Here the stage-2 core is re-arranged instead (a copy the size of the core), so the
    gradient comes out as (φ, ρ, γ, N), which is (γ, φρ, N) as a view, and stage 1's core is re-arranged to
    (γ, φρ, α) to match.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, A: Tensor, B: Tensor, sizes: tuple[int, ...]) -> Tensor:
        a, _, g, _, e, f, r = sizes
        n = x.shape[0]
        xt = x.reshape(n, g, a).permute(1, 2, 0)  # (γ, α, N) view
        z = torch.bmm(A.reshape(g, r * f, a), xt)  # (γ, ρφ, N)
        zt = z.reshape(g * r, f, n).transpose(0, 1)  # (φ, γρ, N) view
        y = torch.bmm(B.reshape(f, e, g * r), zt)  # (φ, ε, N)
        ctx.save_for_backward(x, A, B, z)
        ctx.sizes = sizes
        return y.reshape(f * e, n).t()  # (N, φε) view

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, A, B, z = ctx.saved_tensors
        a, _, g, _, e, f, r = ctx.sizes
        n = x.shape[0]
        need_x, need_a, need_b, _ = ctx.needs_input_grad
        gy = grad.t().reshape(f, e, n)  # (φ, ε, N): a view for token- or feature-major grads
        gx = ga = gb = None
        if need_b:
            zt = z.reshape(g * r, f, n).transpose(0, 1)  # (φ, γρ, N) view
            gb = torch.bmm(zt, gy.transpose(1, 2)).transpose(1, 2).reshape(B.shape)  # (φ, ε, γρ)
        if need_x or need_a:
            if r == 1:
                b_t = B.reshape(f, e, g).transpose(1, 2)  # (φ, γ, ε) view
                a_rows = A.reshape(g, f, a)  # (γ, φ, α) view
            else:
                b_t = B.reshape(f, e, g, r).permute(0, 3, 2, 1).reshape(f, r * g, e)  # (φ, ργ, ε) copy
                a_rows = A.reshape(g, r, f, a).transpose(1, 2).reshape(g, f * r, a)  # (γ, φρ, α) copy
            gz = torch.bmm(b_t, gy)  # (φ, ργ, N)
            gz = gz.reshape(f, r, g, n).permute(2, 0, 1, 3).reshape(g, f * r, n)  # (γ, φρ, N) view
            if need_x:
                gx = torch.bmm(a_rows.transpose(1, 2), gz).reshape(g * a, n).t()  # (N, γα) view
            if need_a:
                xt = x.reshape(n, g, a).permute(1, 2, 0)  # (γ, α, N) view
                ga_rows = torch.bmm(gz, xt.transpose(1, 2))  # (γ, φρ, α)
                ga = ga_rows.reshape(g, f, r, a).transpose(1, 2).reshape(A.shape)  # (γ, ρ, φ, 1, α)
        return gx, ga, gb, None


def _run_program(stages: tuple[_Stage, ...], x: Tensor, cores: Mapping[str, Tensor], size: Mapping[str, int]) -> Tensor:
    """Execute a searched two-stage bmm program on (N, in_size) ``x``; returns (N, out_size)."""
    x_letters = "".join(c for c in _X if c == "n" or size[c] > 1)
    act = x.reshape([size[c] for c in x_letters])  # (N, γ, β, α) minus unit axes; a view
    letters = x_letters
    for stage in stages:
        act = _run_stage(stage, act, letters, cores[stage.weight], size)
        letters = stage.out
    y_letters = "".join(c for c in _Y if c == "n" or size[c] > 1)
    y = act.permute([letters.index(c) for c in y_letters])  # (N, φ, ε, δ) minus unit axes
    out_size = 1
    for c in y_letters[1:]:  # a loop, not math.prod: torch.compile traces it with symbolic sizes
        out_size = out_size * size[c]
    return y.reshape(size["n"], out_size)  # (N, φεδ): a view when the program planned one


def _run_stage(stage: _Stage, act: Tensor, letters: str, core: Tensor, size: Mapping[str, int]) -> Tensor:
    """One bmm of ``stage``; ``act`` has dimensions ``letters``; returns a tensor with dimensions ``stage.out``."""

    def prod(group: str) -> int:
        total = 1
        for c in group:  # a loop, not math.prod: torch.compile traces it with symbolic sizes
            total = total * size[c]
        return total

    held = stage.batch + stage.act_free + stage.contract
    act3 = act.permute([letters.index(c) for c in held]).reshape(
        prod(stage.batch), prod(stage.act_free), prod(stage.contract)
    )  # (batch, free, contract); a view unless the stage copies the activation
    w = core.reshape([size[c] for c in stage.weight_letters])  # the core without unit axes
    rows, cols = (stage.contract, stage.weight_free) if stage.act_left else (stage.weight_free, stage.contract)
    target = stage.batch + rows + cols
    w = w.permute([stage.weight_letters.index(c) for c in target if c in stage.weight_letters])
    for i, c in enumerate(target):
        if c not in stage.weight_letters:  # a batch letter of the activation only: broadcast the core
            w = w.unsqueeze(i)
            w = w.expand(*w.shape[:i], size[c], *w.shape[i + 1 :])
    w3 = w.reshape(prod(stage.batch), prod(rows), prod(cols))  # (batch, rows, cols)
    if stage.act_left:
        out = torch.bmm(act3, w3)  # (batch, free, weight_free)
    else:
        out = torch.bmm(w3, act3.transpose(1, 2))  # (batch, weight_free, free)
    return out.reshape([size[c] for c in stage.out])  # letters of stage.out; a view
