"""Estimator plumbing: held-out choice, integrals, tails and honest standard errors (spec §7)."""

import math

import pytest
import torch

from itdcli.core import estimators as est
from itdcli.core.proposal import Proposal, cdf_points, stratum_groups

F64 = torch.float64


def test_crossfit_choice_uses_only_the_other_fold() -> None:
    """Changing the errors of fold-0 images must not change the choice made for them."""
    gen = torch.Generator().manual_seed(0)
    errors = torch.rand(3, 40, 6, generator=gen, dtype=F64)
    folds = est.crossfit_folds(40, 2, gen)
    columns = torch.arange(6).expand(40, 6)  # one bin per point column
    before = est.choose(errors, folds, "crossfit", columns)
    changed = errors.clone()
    changed[:, folds == 0] = torch.rand(3, int((folds == 0).sum()), 6, generator=gen, dtype=F64) * 10
    after = est.choose(changed, folds, "crossfit", columns)
    assert torch.equal(before[folds == 0], after[folds == 0])
    held_out = errors[:, folds == 1].mean(1).argmin(0)
    assert torch.equal(before[folds == 0][0], held_out)


def test_same_and_none_selections() -> None:
    errors = torch.tensor([[[1.0, 5.0]], [[2.0, 1.0]]], dtype=F64).expand(2, 4, 2)
    folds = torch.tensor([0, 1, 0, 1])
    columns = torch.tensor([0, 1]).expand(4, 2)
    assert est.choose(errors, folds, "same", columns).tolist() == [[0, 1]] * 4
    assert est.choose(errors, folds, "none", columns).tolist() == [[0, 0]] * 4
    assert est.chosen(errors, est.choose(errors, folds, "same", columns)).tolist() == [[1.0, 1.0]] * 4
    # one bin for both columns: the candidate with the lower mean over both (3 against 1.5) everywhere
    assert est.choose(errors, folds, "same", torch.zeros(4, 2, dtype=torch.long)).tolist() == [[1, 1]] * 4


def test_the_choice_is_per_logsnr_bin_whatever_the_column() -> None:
    """Cells of two rounds (columns 0–1 and 2–5) in the same bin get the same choice."""
    gen = torch.Generator().manual_seed(2)
    errors = torch.rand(2, 30, 6, generator=gen, dtype=F64)
    bins = torch.tensor([0, 1, 0, 0, 1, 1]).expand(30, 6)
    choice = est.choose(errors, torch.zeros(30, dtype=torch.long), "same", bins)
    assert bool((choice[:, [0, 2, 3]] == choice[0, 0]).all()) and bool((choice[:, [1, 4, 5]] == choice[0, 1]).all())


def test_standard_errors_monte_carlo_and_sampling() -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=F64)
    e = est.Estimate(values, torch.tensor([0.04, 0.01, 0.09, 0.02], dtype=F64))
    assert e.mean == pytest.approx(3.5)
    assert e.stderr == pytest.approx(math.sqrt(0.16) / 4)
    assert e.sampling_stderr == pytest.approx(float(values.std()) / 2)
    assert math.isnan(est.Estimate(values[:1], torch.zeros(1)).sampling_stderr)
    assert math.isnan(est.Estimate(values, torch.full((4,), math.nan)).stderr)


def test_variance_of_iid_points_is_the_sample_variance_over_j() -> None:
    y = torch.tensor([[1.0, 2.0, 6.0, 3.0]], dtype=F64)
    e = est.integral(torch.ones_like(y), y, torch.zeros(4, dtype=torch.long))
    assert float(e.per_image) == pytest.approx(3.0)
    assert float(e.mc_var) == pytest.approx(float(y.var()) / 4)
    # two groups (stratum pairs): Σ_g 2·Σ(y − ȳ_g)² / J² = (2·0.5 + 2·4.5) / 16
    paired = est.integral(torch.ones_like(y), y, torch.tensor([0, 0, 1, 1]))
    assert float(paired.mc_var) == pytest.approx(10 / 16)


@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_reported_variance_matches_the_spread_over_repetitions(scheme: str) -> None:
    """Independent repetitions of a stratified or i.i.d. importance-sampled integral with noise: the mean
    reported variance equals the variance actually seen (stratified: two points per stratum)."""
    p = Proposal("logistic", 1.0, 1.5, -4.0, 6.0)
    gen = torch.Generator().manual_seed(0)
    reps, j = 4000, 16
    u = torch.stack([cdf_points(j, scheme, gen) for _ in range(reps)])  # type: ignore[arg-type]
    g = p.icdf(u)
    f = torch.sigmoid(g) * (1 + 0.5 * torch.randn(g.shape, generator=gen, dtype=F64))
    e = est.integral(p.weight(g), f, stratum_groups(j, scheme))  # type: ignore[arg-type]
    seen = float(e.per_image.var())
    reported = float(e.mc_var.mean())
    exact = math.log1p(math.e**6) - math.log1p(math.e**-4)
    assert abs(float(e.per_image.mean()) - exact) < 4 * math.sqrt(seen / reps)
    assert reported == pytest.approx(seen, rel=0.08)


def test_control_variate_keeps_the_mean_and_removes_the_correlated_noise() -> None:
    """values = m + 3·c + small noise with E[c] = 0: β = 3 is found per bin on the other fold."""
    gen = torch.Generator().manual_seed(4)
    n, j = 400, 8
    c = torch.randn(n, j, generator=gen, dtype=F64)
    values = 5.0 + 3.0 * c + 0.1 * torch.randn(n, j, generator=gen, dtype=F64)
    w = torch.ones(n, j, dtype=F64)
    bins = torch.arange(j).expand(n, j) // 4
    folds = est.crossfit_folds(n, 2, torch.Generator().manual_seed(1))
    out = est.control_variate(values, c, w, bins, folds)
    assert float(out.std()) == pytest.approx(0.1, rel=0.1)
    assert float(out.mean()) == pytest.approx(5.0, abs=3 * 0.1 / math.sqrt(n * j))
    # β is fitted per bin: noise unrelated to c in the second bin is left alone (β ≈ 0 there)
    values2 = torch.where(bins == 0, values, 5.0 + 0.1 * torch.randn(n, j, generator=gen, dtype=F64))
    out2 = est.control_variate(values2, c, w, bins, folds)
    assert torch.allclose(out2[bins == 1], values2[bins == 1], atol=0.05)
    assert float(out2[bins == 1].std()) == pytest.approx(float(values2[bins == 1].std()), rel=0.02)


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
    groups = torch.zeros(2, dtype=torch.long)
    assert est.nll_continuous(10.0, mmse_g, w, err, groups).mean == pytest.approx(10.0 - 1.5)
    point = est.nll_continuous_pointwise(torch.tensor([5.0], dtype=F64), mmse_g, w, err, groups)
    assert point.mean == pytest.approx(3.5)
    # (1/J) Σ w err = (2 + 12)/2 = 7 → ½·7 + tails
    assert est.nll_discrete(torch.tensor([0.25]), 0.5, w, err, groups).mean == pytest.approx(3.5 + 0.75)
    deq = est.nll_dequantized(10.0, mmse_g, w, err, groups, dim=3, levels=17)
    assert deq.mean == pytest.approx(8.5 + 3 * math.log(8))
