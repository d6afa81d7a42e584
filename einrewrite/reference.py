"""The paper's naive execution of a structured layer: two ``torch.einsum`` calls (paper-notes §6).

This is how the authors' ``EinOpVec2._rmatmat`` runs a general einsum layer, on cores in their layout
``A (φ, δ, ρ, γ, α)`` and ``B (φ, ε, ρ, γ, β)``, with ``.contiguous()`` after each call. It shares no code with
:mod:`einrewrite.contraction`, so tests use it as an independent oracle, and ``benchmarks/layers.py`` times
it as the baseline that the planned contraction has to beat.

Letters: Z tokens, a α, b β, g γ, d δ, e ε, f φ, r ρ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

if TYPE_CHECKING:
    from .layers import EinsumLinear

__all__ = ["paper_cores", "reference_forward"]


def paper_cores(layer: EinsumLinear) -> tuple[Tensor, Tensor]:
    """The layer's cores permuted into the paper's layout, as contiguous tensors (still differentiable).

    Args:
        layer: a structured (non-dense) layer; its ``A`` is (γ, ρ, φ, δ, α) and ``B`` is (φ, ε, γ, ρ, β).

    Returns:
        ``(A, B)`` with shapes (φ, δ, ρ, γ, α) and (φ, ε, ρ, γ, β).

    Examples:
        >>> from einrewrite import EinsumLinear, structure
        >>> A, B = paper_cores(EinsumLinear(structure("btt", 64, 64, rank=2)))
        >>> tuple(A.shape), tuple(B.shape)
        ((8, 1, 2, 8, 8), (8, 8, 2, 8, 1))
    """
    if layer.spec.is_dense:
        raise ValueError(f"{layer.spec.describe()} is dense: it has no A and B cores in the paper's layout")
    a_core = layer.A.permute(2, 3, 1, 0, 4).contiguous()  # (γ, ρ, φ, δ, α) -> (φ, δ, ρ, γ, α)
    b_core = layer.B.permute(0, 1, 3, 2, 4).contiguous()  # (φ, ε, γ, ρ, β) -> (φ, ε, ρ, γ, β)
    return a_core, b_core


def reference_forward(x: Tensor, layer: EinsumLinear, cores: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``layer(x)`` computed the paper's way: two einsums, each followed by ``.contiguous()``.

    Args:
        x: input of shape (..., in_features).
        layer: the structured layer whose cores and bias are used.
        cores: ``paper_cores(layer)`` computed beforehand (benchmarks keep the permutation out of the timing);
            taken from ``layer`` when omitted.

    Returns:
        (..., out_features), equal to ``F.linear(x, layer.to_dense(), layer.bias)``.

    Examples:
        >>> import torch
        >>> from einrewrite import EinsumLinear, structure
        >>> layer = EinsumLinear(structure("kronecker", 64, 48))
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(reference_forward(x, layer), layer(x), atol=1e-5)
        True
    """
    spec = layer.spec
    if spec.is_dense:
        return F.linear(x, layer.weight, layer.bias)
    a_core, b_core = paper_cores(layer) if cores is None else cores
    a, b, g, _, _, _, _ = spec.sizes
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec.d_in)  # (Z, d_in)
    if spec.sizes.in_size != spec.d_in:
        x2 = F.pad(x2, (0, spec.sizes.in_size - spec.d_in))  # (Z, in_size): padded features are zeros
    xs = x2.reshape(-1, g, b, a)  # (Z, γ, β, α)
    z = torch.einsum("Zgba,fdrga->Zfdrgb", xs, a_core).contiguous()  # (Z, φ, δ, ρ, γ, β)
    y = torch.einsum("Zfdrgb,fergb->Zfed", z, b_core).contiguous()  # (Z, φ, ε, δ)
    y = y.reshape(-1, spec.sizes.out_size)[:, : spec.d_out]  # (Z, d_out)
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*lead, spec.d_out)  # (..., d_out)
