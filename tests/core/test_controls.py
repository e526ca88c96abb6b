"""The noise moments used as control variates have mean zero exactly and sum over the right pixels."""

import math

import pytest
import torch

from itdcli.core import controls

F64 = torch.float64


def test_half_moments_match_their_closed_forms() -> None:
    """E[ε²1{ε>0}] = ½ and E[ε1{ε>0}] = φ(0) = 1/√(2π), by quadrature of the standard normal density."""
    e = torch.linspace(0, 12, 200001, dtype=F64)
    phi = torch.exp(-(e**2) / 2) / math.sqrt(2 * math.pi)
    assert float(torch.trapezoid(e**2 * phi, e)) == pytest.approx(0.5, abs=1e-9)
    assert float(torch.trapezoid(e * phi, e)) == pytest.approx(controls.PHI0, abs=1e-9)


def test_moments_have_mean_zero_for_standard_normal_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    b, d = 200_000, 6
    eps = torch.randn(b, d, generator=gen, dtype=F64)
    low = torch.tensor([True, True, False, False, False, False]).expand(b, d)
    high = torch.tensor([False, False, False, False, False, True]).expand(b, d)
    m = controls.noise_moments(eps, low, high)
    assert m.shape == (b, len(controls.NAMES))
    se = m.std(0) / math.sqrt(b)
    assert bool((m.mean(0).abs() < 4 * se).all())


def test_each_column_sums_its_moment_over_its_class_of_pixels() -> None:
    eps = torch.tensor([[1.5, -2.0, 0.5]], dtype=F64)
    low, high = torch.tensor([[True, False, False]]), torch.tensor([[False, False, True]])
    m = dict(zip(controls.NAMES, controls.noise_moments(eps, low, high)[0].tolist(), strict=True))
    assert m["ctl_sq_low"] == pytest.approx(1.5**2 - 1)
    assert m["ctl_sq_inside"] == pytest.approx(2.0**2 - 1)
    assert m["ctl_sq_pos_inside"] == pytest.approx(-0.5)  # ε < 0: only the constant remains
    assert m["ctl_lin_high"] == pytest.approx(0.5)
    assert m["ctl_lin_pos_low"] == pytest.approx(1.5 - controls.PHI0)
