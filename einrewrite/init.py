"""Initialisation of structured cores: µP per core, projection of a dense weight, structure-aware LRs.

Math: paper-notes §4 (µP, learning rates) and §8 (projection).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .spec import EinsumSpec

__all__ = ["mup_std", "param_groups", "project_weight"]

# Padded layers: the projection alternates "fill the padding with the current fit" and "project" (an EM-style
# imputation, monotone in the error on the real entries) until the error stops improving.
_IMPUTE_STEPS = 12
_IMPUTE_RTOL = 1e-4


def mup_std(fan_in: int, fan_out: int) -> float:
    """Spectral µP standard deviation σ = fan_in^-½ · min(1, √(fan_out / fan_in))."""
    return fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in))


def cores_to_dense(spec: EinsumSpec, cores: dict[str, Tensor]) -> Tensor:
    """The operator's full (out_size, in_size) matrix, padding included."""
    if spec.is_dense:
        return cores["weight"]
    s = spec.sizes
    full = torch.einsum("grfda,fegrb->fedgba", cores["A"], cores["B"])  # (φ, ε, δ, γ, β, α)
    return full.reshape(s.out_size, s.in_size)


def project_weight(weight: Tensor, spec: EinsumSpec) -> tuple[dict[str, Tensor], float]:
    """Frobenius-optimal cores for a dense ``weight`` of shape (d_out, d_in), and the relative error.

    Each (φ, γ) block of W is a sum of ρ Kronecker products B ⊗ A; after the Van Loan-Pitsianis
    rearrangement it is a rank-ρ matrix, so a truncated SVD per block is optimal (paper-notes §8). Padded
    layers are solved by imputation of the padding entries, which lowers the error on the real entries.

    Returns:
        The cores by name (float32 or the weight's dtype if float64) and ‖W - Ŵ‖_F / ‖W‖_F.
    """
    weight = weight.detach()
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(work_dtype)
    if spec.is_dense:
        return {"weight": w.clone()}, 0.0
    s = spec.sizes
    target = torch.zeros(s.out_size, s.in_size, dtype=work_dtype, device=w.device)
    target[: spec.d_out, : spec.d_in] = w
    cores = _project_full(target, spec)
    padded = (s.out_size, s.in_size) != (spec.d_out, spec.d_in)
    error = _relative_error(w, cores, spec)
    for _ in range(_IMPUTE_STEPS if padded else 0):
        fit = cores_to_dense(spec, cores)
        target = fit.clone()
        target[: spec.d_out, : spec.d_in] = w  # keep the real entries, impute the padding with the fit
        candidate = _project_full(target, spec)
        new_error = _relative_error(w, candidate, spec)
        if new_error > error * (1 - _IMPUTE_RTOL):
            if new_error < error:
                cores, error = candidate, new_error
            break
        cores, error = candidate, new_error
    return cores, error


def _relative_error(w: Tensor, cores: dict[str, Tensor], spec: EinsumSpec) -> float:
    fit = cores_to_dense(spec, cores)[: spec.d_out, : spec.d_in]
    norm = torch.linalg.matrix_norm(w)
    return float(torch.linalg.matrix_norm(w - fit) / norm) if norm > 0 else float(torch.linalg.matrix_norm(fit))


def _project_full(target: Tensor, spec: EinsumSpec) -> dict[str, Tensor]:
    """Per-block truncated SVD of the rearranged (out_size, in_size) matrix."""
    a, b, g, d, e, f, r = spec.sizes
    blocks = target.reshape(f, e, d, g, b, a).permute(0, 3, 1, 4, 2, 5)  # (φ, γ, ε, β, δ, α)
    blocks = blocks.reshape(f * g, e * b, d * a)  # per (φ, γ): [(ε, β), (δ, α)]
    left, right = _truncated_svd(blocks, r)  # (φγ, εβ, k), (φγ, k, δα)
    k = left.shape[-1]
    if k < r:  # more bond than the block's rank: the extra slices are zero
        left = torch.nn.functional.pad(left, (0, r - k))
        right = torch.nn.functional.pad(right, (0, 0, 0, r - k))
    B = left.reshape(f, g, e, b, r).permute(0, 2, 1, 4, 3)  # (φ, ε, γ, ρ, β)
    A = right.reshape(f, g, r, d, a).permute(1, 2, 0, 3, 4)  # (γ, ρ, φ, δ, α)
    return {"A": A.contiguous(), "B": B.contiguous()}


_SMALL_EIGH = 256  # below this size a LAPACK call is too small to share between threads


@contextlib.contextmanager
def _lapack_threads(n: int) -> Iterator[None]:
    """Run LAPACK with ``n`` threads. Batched eigh loops over small matrices one by one; with more than one
    thread each tiny call wakes the BLAS thread pool, which on a busy machine took minutes instead of a second
    (8192 blocks of 32x32: 1.1 s on one thread, 7-190 s on two)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _truncated_svd(blocks: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Best rank-``k`` factors ``L @ R`` of each matrix in ``blocks`` (batch, m, n), k = min(r, m, n).

    The singular values are split evenly (``L = U√S``, ``R = √S Vᵀ``). Computed from the eigenvectors of the
    smaller Gram matrix in float64: a batch of small symmetric eigenproblems is several times faster on CPU
    than batched ``linalg.svd``, and the leading singular pairs (all a truncation keeps) come out to float32
    accuracy.
    """
    m, n = blocks.shape[-2:]
    k = min(r, m, n)
    x = blocks.to(torch.float64)
    tall = m >= n
    xt = x.mT if tall else x  # (batch, short, long)
    gram = xt @ xt.mT  # (batch, short, short)
    with _lapack_threads(1 if gram.shape[-1] <= _SMALL_EIGH else torch.get_num_threads()):
        _, vecs = torch.linalg.eigh(gram)  # eigenvalues ascending; vecs (batch, short, short)
    u = vecs[..., -k:].flip(-1)  # (batch, short, k): leading singular vectors of the short side
    p = u.mT @ xt  # (batch, k, long) = S_k V_kᵀ
    sv = torch.linalg.vector_norm(p, dim=-1)  # (batch, k)
    root = sv.sqrt()
    safe = torch.where(sv > 0, root, torch.ones_like(root))
    short_f = u * root[:, None, :]  # (batch, short, k)
    long_f = torch.where(sv[..., None] > 0, p / safe[..., None], torch.zeros_like(p))  # (batch, k, long)
    left, right = (long_f.mT, short_f.mT) if tall else (short_f, long_f)  # (batch, m, k), (batch, k, n)
    return left.to(blocks.dtype), right.to(blocks.dtype)


def param_groups(
    model: nn.Module, lr: float, *, base_width: int | None = None, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Adam parameter groups with structure-aware learning rates (paper-notes §4.1).

    A core of a structured layer gets ``lr · w / (n_cores · fan_in(core))``; a dense matrix gets
    ``lr · w / fan_in``; vectors, norms and embeddings get ``lr``. ``w`` is ``base_width`` (µP transfer from
    a base model) or, when omitted, the layer's own input width, so a dense layer keeps ``lr``. Matrices get
    ``weight_decay``; vectors never do.

    Examples:
        >>> import torch
        >>> from einrewrite import EinsumLinear, structure, param_groups
        >>> layer = EinsumLinear(structure("monarch", 64, 64))
        >>> opt = torch.optim.AdamW(param_groups(layer, lr=1e-3))
    """
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    seen: set[int] = set()

    def add(name: str, p: nn.Parameter, group_lr: float, wd: float) -> None:
        if id(p) in seen or not p.requires_grad:
            return
        seen.add(id(p))
        group = groups.setdefault((group_lr, wd), {"params": [], "param_names": [], "lr": group_lr, "weight_decay": wd})
        group["params"].append(p)
        group["param_names"].append(name)

    for module_name, module in model.named_modules():
        multipliers = getattr(module, "lr_multipliers", None)
        if callable(multipliers):
            for pname, mult in multipliers(base_width).items():
                # get_parameter: a multiplier may name a child's parameter ("router.weight" of an MoE layer)
                add(_join(module_name, pname), module.get_parameter(pname), lr * mult, weight_decay)
        elif isinstance(module, nn.Linear):
            fan_in = module.in_features
            add(_join(module_name, "weight"), module.weight, lr * (base_width or fan_in) / fan_in, weight_decay)
    for name, p in model.named_parameters():
        add(name, p, lr, weight_decay if p.ndim >= 2 and not _is_embedding(model, name) else 0.0)
    return list(groups.values())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_embedding(model: nn.Module, param_name: str) -> bool:
    owner = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    try:
        return isinstance(model.get_submodule(owner), nn.Embedding)
    except AttributeError:
        return False


def named_cores(module: nn.Module, names: Iterable[str]) -> dict[str, Tensor]:
    """The module's parameters named ``names``, as a dict."""
    return {name: getattr(module, name) for name in names}
