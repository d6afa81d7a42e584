"""Integer sizes, padding policy, counts and serialisation of EinsumSpec."""

from __future__ import annotations

import math

import opt_einsum
import pytest

from einrewrite import EinsumSpec, PaddingError, StructureMismatchError, factorize, structure


def test_exact_factorizations_are_preferred() -> None:
    assert factorize(768, (0.5, 0.5)) == (24, 32)
    assert factorize(3072, (0.5, 0.5)) == (48, 64)
    assert factorize(1024, (0.5, 0.5)) == (32, 32)
    assert factorize(1024, (0.5, 0.25, 0.25)) == (32, 4, 8)


@pytest.mark.parametrize("d", [97, 769, 50257, 7919])
def test_prime_sizes_are_padded_never_cropped(d: int) -> None:
    sizes = factorize(d, (0.5, 0.5))
    assert math.prod(sizes) >= d
    assert math.prod(sizes) / d - 1 < 0.05


def test_monarch_768_is_exact_and_reports_no_padding() -> None:
    spec = EinsumSpec("(.5|0|.5|0|.5|.5|0)", 768, 768)
    assert spec.sizes.in_size == 768 and spec.sizes.out_size == 768
    assert spec.padding == (0, 0) and spec.padding_overhead == 0


def test_prime_size_pads_and_reports_overhead() -> None:
    spec = EinsumSpec("(.5|0|.5|0|.5|.5|0)", 97, 97)
    assert spec.sizes.in_size >= 97 and spec.padding[0] == spec.sizes.in_size - 97
    assert 0 < spec.padding_overhead <= 0.15


def test_padding_above_tolerance_is_refused_with_a_fix() -> None:
    with pytest.raises(PaddingError, match=r"pads the input from 65 to 128 .*above the tolerance of 15%"):
        structure("monarch", 65, 64, blocks=64)
    spec = EinsumSpec.from_sizes((2, 1, 64, 1, 1, 64, 1), 65, 64, name="monarch", pad_tolerance=1.0)
    assert spec.sizes.in_size == 128


def test_sizes_smaller_than_the_layer_are_refused() -> None:
    with pytest.raises(StructureMismatchError, match="never drops features"):
        EinsumSpec.from_sizes((8, 1, 8, 1, 8, 8, 1), 65, 64, name="monarch")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(.5|0|.5|0|.5|.5|0)", (32, 1, 32, 1, 32, 32, 1)),
        ("(.5|.5|0|.5|.5|0|0)", (32, 32, 1, 32, 32, 1, 1)),
        ("(.5|0|.5|0|.5|.5|.25)", (32, 1, 32, 1, 32, 32, 6)),
        ("(1|0|0|0|1|0|.5)", (1024, 1, 1, 1, 1024, 1, 32)),
    ],
)
def test_sizes_at_1024_match_the_paper_table(text: str, expected: tuple[int, ...]) -> None:
    assert tuple(EinsumSpec(text, 1024, 1024).sizes) == expected


def test_paper_counts_at_1024() -> None:
    monarch = EinsumSpec("(.5|0|.5|0|.5|.5|0)", 1024, 1024)
    assert (monarch.params, monarch.macs) == (65_536, 65_536)
    kron = EinsumSpec("(.5|.5|0|.5|.5|0|0)", 1024, 1024)
    assert (kron.params, kron.macs) == (2_048, 65_536)
    tt = EinsumSpec("(.5|.5|0|.5|.5|0|.25)", 1024, 1024)
    assert (tt.params, tt.macs) == (12_288, 393_216)


@pytest.mark.parametrize("text", ["(.5|.25|.25|.25|.5|.25|.25)", "(.5|.5|0|.5|.5|0|.25)", "(.5|0|.5|0|.5|.5|.25)"])
@pytest.mark.parametrize("tokens", [1, 64])
def test_macs_equal_opt_einsum_cost_of_the_cheapest_activation_first_order(text: str, tokens: int) -> None:
    spec = EinsumSpec(text, 96, 160)
    a, b, g, *_ = spec.sizes
    shapes = [(tokens, g, b, a), spec.core_shapes["A"], spec.core_shapes["B"]]
    costs = []
    for path in ([(0, 1), (0, 1)], [(0, 2), (0, 1)]):
        _, info = opt_einsum.contract_path(spec.equation, *shapes, shapes=True, optimize=path)
        macs = 0
        for step in info.contraction_list:  # multiplies of a pairwise step = product of all its index sizes
            inputs, out = step[2].split("->")
            letters = set(inputs.replace(",", "")) | set(out)
            macs += math.prod(info.size_dict[c] for c in letters)
        assert int(info.opt_cost) == 2 * macs  # every step sums over an axis here: opt_einsum counts 2 FLOPs/MAC
        costs.append(macs)
    assert spec.macs * tokens == min(costs)


def test_spec_round_trips_through_a_dict() -> None:
    spec = structure("btt", 768, 3072, rank=2)
    again = EinsumSpec.from_dict(spec.to_dict())
    assert again == spec and hash(again) == hash(spec)


def test_from_dict_of_garbage_is_a_clear_error() -> None:
    with pytest.raises(StructureMismatchError, match="not a valid EinsumSpec dict"):
        EinsumSpec.from_dict({"theta": [0.5]})
