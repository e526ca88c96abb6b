"""Estimator plumbing: held-out choice, integrals, tails and honest standard errors (spec §7)."""

import math

import pytest
import torch

from itdcli.core import estimators as est

F64 = torch.float64


def test_crossfit_choice_uses_only_the_other_fold() -> None:
    """Changing the errors of fold-0 images must not change the choice made for them."""
    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(3, 40, 6, generator=gen, dtype=F64)
    folds = est.crossfit_folds(40, 2, gen)
    before = est.choose(errors, folds, "crossfit")
    changed = errors.clone()
    changed[:, folds == 0] = torch.rand(3, int((folds == 0).sum()), 6, generator=gen, dtype=F64) * 10
    after = est.choose(changed, folds, "crossfit")
    assert torch.equal(before[folds == 0], after[folds == 0])
    held_out = errors[:, folds == 1].mean(1).argmin(0)
    assert torch.equal(before[folds == 0][0], held_out)


def test_same_and_none_selections() -> None:
    errors = torch.tensor([[[1.0, 5.0]], [[2.0, 1.0]]], dtype=F64).expand(2, 4, 2)
    folds = torch.tensor([0, 1, 0, 1])
    assert est.choose(errors, folds, "same").tolist() == [[0, 1]] * 4
    assert est.choose(errors, folds, "none").tolist() == [[0, 0]] * 4
    assert est.chosen(errors, est.choose(errors, folds, "same")).tolist() == [[1.0, 1.0]] * 4


def test_standard_error_is_std_over_sqrt_n() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=F64)
    e = est.Estimate(values)
    assert e.mean == pytest.approx(3.5)
    assert e.stderr == pytest.approx(float(values.std()) / 2)
    assert math.isnan(est.Estimate(values[:1]).stderr)


def test_right_tail_is_the_derived_bound_and_vanishes_for_cifar() -> None:
    dim, levels, g = 10, 5, 2.0
    delta = 2 / (levels - 1)
    direct = 4 * dim * sum(math.exp(-((j - 0.5) ** 2) * delta**2 * math.exp(g) / 2) for j in range(1, levels))
    assert est.right_tail(g, dim, levels) == pytest.approx(direct)
    assert est.right_tail(18.651862, 3072, 256) == 0.0


def test_continuous_forms_and_discrete_assemble_the_integral() -> None:
    w = torch.tensor([[2.0, 4.0]], dtype=F64)
    err = torch.tensor([[1.0, 3.0]], dtype=F64)
    mmse_g = torch.tensor([[2.0, 4.0]], dtype=F64)
    # (1/J) Σ w f = ((2·1) + (4·1))/2 = 3 for f = mmse_g − err = 1
    assert est.nll_continuous(10.0, mmse_g, w, err).mean == pytest.approx(10.0 - 1.5)
    assert est.nll_continuous_pointwise(torch.tensor([5.0], dtype=F64), mmse_g, w, err).mean == pytest.approx(3.5)
    # (1/J) Σ w err = (2 + 12)/2 = 7 → ½·7 + tails
    assert est.nll_discrete(torch.tensor([0.25]), 0.5, w, err).mean == pytest.approx(3.5 + 0.75)
    deq = est.nll_dequantized(10.0, mmse_g, w, err, dim=3, levels=17)
    assert deq.mean == pytest.approx(8.5 + 3 * math.log(8))
