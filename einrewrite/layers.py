"""`EinsumLinear`: one drop-in replacement for `nn.Linear` serving every einsum structure."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import contraction
from .errors import StructureMismatchError
from .init import cores_to_dense, mup_std, project_weight
from .spec import EinsumSpec

__all__ = ["EinsumLinear"]


class EinsumLinear(nn.Module):
    """A linear layer whose weight has the structure of ``spec``.

    It behaves like ``nn.Linear(spec.d_in, spec.d_out)``: any leading dimensions, ``in_features`` and
    ``out_features``, dtype and device follow ``.to()``, autocast and ``torch.compile`` work. Parameters are
    ``A (γ, ρ, φ, δ, α)`` and ``B (φ, ε, γ, ρ, β)`` (or ``weight`` for the dense point). The contraction is
    planned once, at construction (:mod:`einrewrite.contraction`). A fresh layer has µP-initialised cores.

    Args:
        spec: the bound structure, e.g. ``einrewrite.structure("btt", 768, 3072, rank=2)``.
        bias: whether to learn an additive bias.
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Examples:
        >>> import torch
        >>> from einrewrite import EinsumLinear, structure
        >>> layer = EinsumLinear(structure("monarch", 64, 32))
        >>> layer(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(
        self,
        spec: EinsumSpec,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(spec, EinsumSpec):
            raise StructureMismatchError(
                f"EinsumLinear needs an EinsumSpec, got {type(spec).__name__}; build one with "
                "einrewrite.structure(name, d_in, d_out, ...) or EinsumSpec(theta, d_in, d_out)"
            )
        self.spec = spec
        self.in_features = spec.d_in  # nn.Linear-compatible attributes
        self.out_features = spec.d_out
        self.core_names = tuple(spec.core_shapes)
        for name, shape in spec.core_shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.bias = nn.Parameter(torch.zeros(spec.d_out, device=device, dtype=dtype)) if bias else None
        self.plan = contraction.plan_contraction(spec)
        self.projection_error: float | None = None
        self.reset_parameters()

    # ---- construction ----------------------------------------------------------------------------------
    def reset_parameters(self, *, zero_last: bool = False) -> None:
        """µP init per core: σ = fan_in^-½·min(1, √(fan_out/fan_in)); ``zero_last`` zeroes the last core."""
        with torch.no_grad():
            fans = self.spec.core_fans
            for i, name in enumerate(self.core_names):
                core = getattr(self, name)
                if zero_last and i == len(self.core_names) - 1:
                    core.zero_()
                else:
                    core.normal_(0.0, mup_std(*fans[name]))
            if self.bias is not None:
                self.bias.zero_()
        self.projection_error = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        spec: EinsumSpec | Any,
        *,
        init: Literal["project", "mup"] = "project",
        zero_last: bool = False,
    ) -> EinsumLinear:
        """Replace ``linear`` (an ``nn.Linear``) by a structured layer of the same shape, dtype and device.

        Args:
            linear: the dense layer; its weight is (out_features, in_features).
            spec: an :class:`EinsumSpec` for its shape, or a structure instance (``BTT(rank=2)``) to bind.
            init: ``"project"`` sets the cores to the Frobenius-closest member of the structure and records
                ``projection_error``; ``"mup"`` initialises from scratch for training.
            zero_last: with ``init="mup"``, zero the last core (residual-output layers).
        """
        weight = linear.weight
        bias = getattr(linear, "bias", None)
        return cls.from_weight(weight, bias, spec, init=init, zero_last=zero_last)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        spec: EinsumSpec | Any,
        *,
        init: Literal["project", "mup"] = "project",
        zero_last: bool = False,
    ) -> EinsumLinear:
        """Like :meth:`from_linear` from a (d_out, d_in) weight and an optional bias."""
        d_out, d_in = weight.shape
        if not isinstance(spec, EinsumSpec):
            spec = spec.bind(d_in, d_out)
        if (spec.d_in, spec.d_out) != (d_in, d_out):
            raise StructureMismatchError(
                f"spec {spec.describe()} is bound to {spec.d_in}->{spec.d_out} but the weight is {d_in}->{d_out}"
            )
        if init not in ("project", "mup"):
            raise StructureMismatchError(f"init must be 'project' or 'mup', got {init!r}")
        layer = cls(spec, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        if init == "mup":
            layer.reset_parameters(zero_last=zero_last)
            return layer
        cores, error = project_weight(weight, spec)
        with torch.no_grad():
            for name, value in cores.items():
                getattr(layer, name).copy_(value)
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias.detach())
        layer.projection_error = error
        return layer

    # ---- use -------------------------------------------------------------------------------------------
    def cores(self) -> dict[str, Tensor]:
        """The structured parameters by name."""
        return {name: getattr(self, name) for name in self.core_names}

    def forward(self, x: Tensor) -> Tensor:
        """y = x Wᵀ + b for x of shape (..., in_features)."""
        if x.shape[-1] != self.in_features:
            raise RuntimeError(
                f"EinsumLinear({self.spec.describe()}) expects inputs with {self.in_features} features in the "
                f"last dimension, got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        cores = self.cores()
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, cores = x.to(dtype), {k: v.to(dtype) for k, v in cores.items()}
        elif x.dtype != self.dtype_of_cores:
            x = x.to(self.dtype_of_cores)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = contraction.run(self.spec, self.plan, x.reshape(-1, self.in_features), cores, bias)  # (N, d_out)
        return y.reshape(*lead, self.out_features)  # (..., d_out)

    @property
    def dtype_of_cores(self) -> torch.dtype:
        """The dtype of the structured parameters."""
        return getattr(self, self.core_names[0]).dtype

    def to_dense(self) -> Tensor:
        """The (out_features, in_features) weight W with ``layer(x) == F.linear(x, W, bias)``."""
        return cores_to_dense(self.spec, self.cores())[: self.out_features, : self.in_features]

    def lr_multipliers(self, base_width: int | None = None) -> dict[str, float]:
        """Adam LR multiplier per core: (w / fan_in(core)) / n_cores, w = base_width or in_features."""
        width = base_width or self.in_features
        fans = self.spec.core_fans
        return {name: width / (fans[name][0] * len(self.core_names)) for name in self.core_names}

    @property
    def params(self) -> int:
        """Structured parameter count (bias excluded)."""
        return self.spec.params

    @property
    def macs(self) -> int:
        """Multiply-accumulates per token (bias excluded)."""
        return self.spec.macs

    def extra_repr(self) -> str:
        return (
            f"{self.spec.describe()}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, params={self.params:,} ({self.params / max(1, self.spec.dense_macs):.1%} "
            f"of dense), macs={self.macs:,}"
        )


