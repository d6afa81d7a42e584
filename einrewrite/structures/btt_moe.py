"""BTT-MoE: a mixture of ``num_experts`` rank-1 BTT experts inside one linear layer (arXiv 2410.02117, §3).

The experts are the rank slices of one rank-E Block Tensor-Train: with d_in = γ·α and d_out = φ·ε (as
:class:`~einrewrite.structures.btt.BTT` factors them, odd sizes padded), expert e is
``M_e[(φ,ε),(γ,α)] = Σ B_e[φ,ε,γ] A_e[γ,φ,α]``. A zero-initialised router picks ``top_k`` experts per token and
weights them by a softmax over the selected logits: ``y = Σ_sel g_e · M_e x``.

Letters: α, γ split the input (α inner), ε, φ split the output (ε inner), E experts, k active per token.
Counts per token: ``macs = k·(γαφ + φγε) + d_in·E`` (active experts and the router), ``params =
E·(γαφ + φγε) + d_in·E``. The bound :class:`MoESpec` stands where other structures give an ``EinsumSpec``;
it has no single weight matrix (the function depends on the input), so there is no ``to_dense``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import StructureMismatchError
from ..spec import EinsumSpec, Sizes
from ._base import check_fraction, check_positive_int
from .btt import BTT

__all__ = ["BTTMoE", "MoESpec"]

# (θα, θε) splits the budget solver tries for the experts' blocks (as for BTT); E and k stay as given.
_SPLITS = ((0.5, 0.5), (1 / 3, 2 / 3), (2 / 3, 1 / 3), (0.25, 0.75), (0.75, 0.25), (2 / 3, 2 / 3), (0.75, 0.75))


def _check_experts(num_experts: object, top_k: object) -> None:
    check_positive_int("btt_moe", "num_experts", num_experts)
    check_positive_int("btt_moe", "top_k", top_k)
    if top_k > num_experts:  # type: ignore[operator]
        raise StructureMismatchError(
            f"btt_moe.top_k must be <= num_experts, got top_k={top_k} with num_experts={num_experts}; "
            "lower top_k or add experts"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BTTMoE:
    """BTT-MoE with ``num_experts`` rank-1 BTT experts, ``top_k`` active per token, and the θ split of each side.

    Splits left as None are chosen by the FLOP budget (keeping E and k: ``BTTMoE(num_experts=16)`` in a
    ``RewriteConfig`` sizes the experts' blocks per layer); bound directly, None means the balanced 0.5.
    """

    name: ClassVar[str] = "btt_moe"
    num_experts: int = 8
    top_k: int = 2
    in_split: float | None = None
    out_split: float | None = None

    def __post_init__(self) -> None:
        _check_experts(self.num_experts, self.top_k)
        if self.in_split is not None:
            check_fraction(self.name, "in_split", self.in_split)
        if self.out_split is not None:
            check_fraction(self.name, "out_split", self.out_split)

    @property
    def is_sized_by_budget(self) -> bool:
        """Whether the budget solver picks the splits (both left as None)."""
        return self.in_split is None and self.out_split is None

    def sized_candidates(self, d_in: int, d_out: int) -> Iterator[BTTMoE]:
        """This E and k with each split of the search grid (what the budget solver tries)."""
        for in_split, out_split in _SPLITS:
            yield BTTMoE(num_experts=self.num_experts, top_k=self.top_k, in_split=in_split, out_split=out_split)

    def bind(self, d_in: int, d_out: int) -> MoESpec:
        """The layer plan for a (d_in, d_out) layer.

        Examples:
            >>> spec = BTTMoE().bind(1024, 1024)
            >>> spec.params, spec.macs
            (532480, 139264)
        """
        return MoESpec(
            d_in=d_in, d_out=d_out, num_experts=self.num_experts, top_k=self.top_k,
            in_split=0.5 if self.in_split is None else self.in_split,
            out_split=0.5 if self.out_split is None else self.out_split,
        )

    @classmethod
    def search_space(cls, d_in: int, d_out: int) -> Iterator[BTTMoE]:
        """The experts' block shapes (θ splits) at the default E = 8, k = 2; the solver keeps what fits."""
        yield from cls().sized_candidates(d_in, d_out)

    @classmethod
    def example(cls) -> BTTMoE:
        """An instance for registry-wide tests."""
        return cls(num_experts=4, top_k=2)


@dataclass(frozen=True)
class MoESpec:
    """A :class:`BTTMoE` bound to a (d_in, d_out) layer: sizes, counts, serialisation and ``build``.

    It offers what the rewrite passes, the budget solver and reports read from an ``EinsumSpec``
    (``name, d_in, d_out, params, macs, dense_macs, hyper, hyper_dict, describe, to_dict, from_dict,
    padding_overhead, psi, build``). ``macs`` counts the active experts and the router.

    Args:
        d_in: the layer's input features.
        d_out: the layer's output features.
        num_experts: E, the rank of the underlying BTT.
        top_k: k, experts per token.
        in_split: θα of the experts' input factorization (α ≈ d_in^θα).
        out_split: θε of the output factorization.

    Raises:
        StructureMismatchError: bad E/k, or the BTT factorization does not fit the layer.
    """

    d_in: int
    d_out: int
    num_experts: int = 8
    top_k: int = 2
    in_split: float = 0.5
    out_split: float = 0.5

    name: ClassVar[str] = "btt_moe"

    def __post_init__(self) -> None:
        _check_experts(self.num_experts, self.top_k)
        _ = self.btt  # validates the factorization (padding tolerance, sizes)

    # ---- shapes --------------------------------------------------------------------------------------
    @functools.cached_property
    def expert(self) -> EinsumSpec:
        """One expert: the rank-1 BTT with the layer's block sizes (factorization, padding)."""
        return BTT(rank=1, in_split=self.in_split, out_split=self.out_split).bind(self.d_in, self.d_out)

    @functools.cached_property
    def btt(self) -> EinsumSpec:
        """The rank-E BTT whose rank slices are the experts: the expert's sizes with ρ = E, θ of one expert.

        Built from sizes rather than from ``BTT(rank=E)``: a bond of E may exceed the blocks of a small layer
        (θρ > min(θα, θε), outside the canonical region of single-matrix structures), which is harmless here
        since each token only ever sees k rank-1 slices.
        """
        one = self.expert
        return EinsumSpec(
            one.theta, self.d_in, self.d_out, sizes=one.sizes._replace(rho=self.num_experts), name="btt",
            hyper={"rank": self.num_experts, "in_split": self.in_split, "out_split": self.out_split},
        )

    @property
    def sizes(self) -> Sizes:
        """Axis sizes (α, 1, γ, 1, ε, φ, E) of the rank-E BTT."""
        return self.btt.sizes

    @property
    def core_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expert-major parameter shapes: ``A (E, γ, φ, α)``, ``B (E, φ, ε, γ)``."""
        a, _, g, _, e, f, r = self.sizes
        return {"A": (r, g, f, a), "B": (r, f, e, g)}

    @property
    def core_fans(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) per core "as if rank 1" (paper-notes §4.2): A (α, φ), B (γ, ε)."""
        a, _, g, _, e, f, _ = self.sizes
        return {"A": (a, f), "B": (g, e)}

    @property
    def theta(self) -> Any:
        """θ of one expert (a rank-1 BTT)."""
        return self.expert.theta

    @property
    def padding(self) -> tuple[int, int]:
        """Extra (input, output) features of the experts over the layer."""
        return self.btt.padding

    @property
    def padding_overhead(self) -> float:
        """Relative padding, the larger of the two sides."""
        return self.btt.padding_overhead

    # ---- counts --------------------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """Parameters of one expert, γαφ + φγε."""
        return self.expert.params

    @property
    def expert_macs(self) -> int:
        """MACs per token of one expert (input meets A first, as both dispatch paths run): γαφ + φγε."""
        return self.expert.macs_by_order["xA"]

    @property
    def router_params(self) -> int:
        """The router's d_in·E weights (no bias)."""
        return self.d_in * self.num_experts

    @property
    def params(self) -> int:
        """All experts plus the router (bias excluded)."""
        return self.num_experts * self.expert_params + self.router_params

    @property
    def macs(self) -> int:
        """Active MACs per token: k experts plus the router (the figure the FLOP budget uses)."""
        return self.top_k * self.expert_macs + self.router_params

    @property
    def dense_macs(self) -> int:
        """MACs per token of the dense layer this spec replaces."""
        return self.d_in * self.d_out

    @property
    def psi(self) -> float:
        """1.0: the per-token operator is input-dependent, so the solver's full-rank tie-break is neutral."""
        return 1.0

    @property
    def omega(self) -> float:
        """ω of one expert."""
        return self.expert.omega

    @property
    def nu(self) -> float:
        """ν of one expert."""
        return self.expert.nu

    @property
    def hyper(self) -> tuple[tuple[str, Any], ...]:
        """The structure's hyper-parameters as sorted pairs (what ``BTTMoE(**...)`` takes)."""
        return (
            ("in_split", self.in_split), ("num_experts", self.num_experts), ("out_split", self.out_split),
            ("top_k", self.top_k),
        )

    @property
    def hyper_dict(self) -> dict[str, Any]:
        """For reports: experts, k, the splits and the active MACs per token."""
        return {"experts": self.num_experts, "top_k": self.top_k, "in_split": round(self.in_split, 4),
                "out_split": round(self.out_split, 4), "active_macs": self.macs}

    def structure(self) -> BTTMoE:
        """The unbound structure."""
        return BTTMoE(num_experts=self.num_experts, top_k=self.top_k, in_split=self.in_split,
                      out_split=self.out_split)

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description; ``MoESpec.from_dict(spec.to_dict()) == spec``."""
        return {
            "name": self.name,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "in_split": self.in_split,
            "out_split": self.out_split,
            "sizes": list(self.sizes),  # informational: recomputed from the fields
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoESpec:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                d_in=int(data["d_in"]), d_out=int(data["d_out"]), num_experts=int(data["num_experts"]),
                top_k=int(data["top_k"]), in_split=float(data.get("in_split", 0.5)),
                out_split=float(data.get("out_split", 0.5)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StructureMismatchError(f"not a valid btt_moe spec dict ({e!r}): {data!r}") from None

    def describe(self) -> str:
        """One line: experts, k, the experts' block sizes and the active MACs."""
        a, _, g, _, e, f, _ = self.sizes
        return (
            f"btt_moe(num_experts={self.num_experts}, top_k={self.top_k}) experts (α={a}, γ={g}, ε={e}, φ={f}), "
            f"active MACs {self.macs:,}/token"
        )

    def build(self, weight: Any, bias: Any = None, *, init: str = "project", zero_last: bool = False) -> Any:
        """A :class:`~einrewrite.moe.BTTMoELinear` from a dense (d_out, d_in) ``weight`` and ``bias``."""
        from ..moe import BTTMoELinear  # moe imports this module

        return BTTMoELinear.from_weight(weight, bias, self, init=init, zero_last=zero_last)  # type: ignore[arg-type]
