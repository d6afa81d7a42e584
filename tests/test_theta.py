"""θ parsing, validation messages and the taxonomy of the paper's Fig. 1 points."""

from __future__ import annotations

import math

import pytest

from einrewrite import EinsumSpec, InvalidThetaError, Theta, parse_theta
from einrewrite.theta import canonical_neighbour, validate_theta


def test_text_form_round_trips() -> None:
    theta = parse_theta("(.5|0|.5|0|.5|.5|0)")
    assert theta == Theta(0.5, 0, 0.5, 0, 0.5, 0.5, 0)
    assert parse_theta(str(theta)) == theta
    assert parse_theta([1, 0, 0, 0, 1, 0, 0.25]).rho == 0.25


# The six named points of Fig. 1 (paper-notes §1.4) with their (ω, ψ, ν).
FIG1 = {
    "dense": ("(0|0|1|0|0|1|0)", (0, 1, 1)),
    "low_rank": ("(1|0|0|0|1|0|.25)", (0, 0.25, 0.25)),
    "kronecker": ("(.5|.5|0|.5|.5|0|0)", (0.5, 1, 0.5)),
    "monarch": ("(.5|0|.5|0|.5|.5|0)", (0, 1, 0.5)),
    "btt": ((0.8, 0, 0.2, 0, 0.8, 0.2, 0.1), (0, 0.5, 0.3)),
}


@pytest.mark.parametrize("name", sorted(FIG1))
def test_fig1_taxonomy(name: str) -> None:
    text, (omega, psi, nu) = FIG1[name]
    theta = validate_theta(parse_theta(text))
    assert theta.omega == pytest.approx(omega)
    assert theta.psi == pytest.approx(psi)
    assert theta.nu == pytest.approx(nu)


def test_fig1_tensor_train_point_is_rejected_with_its_true_neighbour() -> None:
    # (⅓,⅔,0,¾,¼,0,0) lies outside the canonical region; ψ would misreport its rank (paper-notes §1.4).
    with pytest.raises(InvalidThetaError, match=r"min\(θα, θε\) = \.25 < min\(θβ, θδ\) = \.667.*swapped roles"):
        validate_theta(Theta(1 / 3, 2 / 3, 0, 3 / 4, 1 / 4, 0, 0))
    neighbour = canonical_neighbour(Theta(1 / 3, 2 / 3, 0, 3 / 4, 1 / 4, 0, 0))
    assert validate_theta(neighbour) == neighbour
    assert neighbour.alpha == pytest.approx(2 / 3, abs=1e-3)


@pytest.mark.parametrize(
    ("theta", "message"),
    [
        ("(.5|0|.5|0|.5|.5)", r"has 6 entries; it needs 7"),
        ("(.5|x|.5|0|.5|.5|0)", r"is not of the form"),
        ((0.5, 0, math.nan, 0, 0.5, 0.5, 0), r"non-finite θγ"),
        ((1.5, 0, -0.5, 0, 0.5, 0.5, 0), r"θα = 1.5 outside \[0, 1\]"),
        ((0.5, 0, 0.4, 0, 0.5, 0.5, 0), r"α\+β\+γ = 0.9; the input axes must sum to 1"),
        ((0.5, 0, 0.5, 0, 0.5, 0.3, 0), r"δ\+ε\+φ = 0.8; the output axes must sum to 1"),
        ((0.5, 0, 0.5, 0, 0.5, 0.5, 0.75), r"θρ = \.75 > min\(θα, θε\) = \.5.*degenerate"),
    ],
)
def test_invalid_theta_names_the_rule_and_a_valid_neighbour(theta: object, message: str) -> None:
    with pytest.raises(InvalidThetaError, match=message) as info:
        EinsumSpec(theta, 64, 64)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    if "neighbour" in str(info.value):
        neighbour = str(info.value).rsplit("neighbour is ", 1)[1]
        validate_theta(parse_theta(neighbour))  # the suggestion itself is valid


def test_sum_tolerance_is_one_percent() -> None:
    EinsumSpec((0.5, 0, 0.505, 0, 0.5, 0.5, 0), 64, 64)
    with pytest.raises(InvalidThetaError):
        EinsumSpec((0.5, 0, 0.52, 0, 0.5, 0.5, 0), 64, 64)
