"""Estimator plumbing: held-out choice, integrals, tails and honest standard errors (spec §7)."""

import math

import pytest
import torch
from torch import Tensor

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


def test_several_control_variates_are_fitted_jointly_and_limited_by_the_cells() -> None:
    """values = m + 3·c1 − 2·c2 + noise: both slopes are found; a bin with few cells fits the first control only."""
    gen = torch.Generator().manual_seed(5)
    n, j = 400, 8
    c = torch.randn(2, n, j, generator=gen, dtype=F64)
    values = 5.0 + 3.0 * c[0] - 2.0 * c[1] + 0.1 * torch.randn(n, j, generator=gen, dtype=F64)
    w = torch.ones(n, j, dtype=F64)
    bins = torch.zeros(n, j, dtype=torch.long)
    folds = est.crossfit_folds(n, 2, torch.Generator().manual_seed(1))
    out = est.control_variate(values, c, w, bins, folds)
    assert float(out.std()) == pytest.approx(0.1, rel=0.1)
    assert float(out.mean()) == pytest.approx(5.0, abs=3 * 0.1 / math.sqrt(n * j))
    # 15 training cells allow one control (MIN_CELLS_PER_CONTROL = 10): c2's part of the noise stays
    few = est.control_variate(values[:30, :1], c[:, :30, :1], w[:30, :1], bins[:30, :1], folds[:30])
    assert float(few.std()) == pytest.approx(2.0, rel=0.35)


def _sigmoid_runs(reps: int, control: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image estimates and Monte Carlo variances of ∫ a_n σ(γ − 2)(1 + 0.3 ξ) dγ over repetitions; exact values."""
    p = Proposal("logistic", 3.0, 2.4, -6.8, 12.8)
    gen = torch.Generator().manual_seed(11)
    n, j = 60, 8
    amp = 1 + 0.3 * torch.randn(n, 1, generator=gen, dtype=F64)
    knots = p.icdf(torch.linspace(0, 1, 7, dtype=F64))
    knots[0], knots[-1] = p.logsnr_min, p.logsnr_max
    vals, var = [], []
    for r in range(reps):
        g = p.icdf(torch.stack([cdf_points(j, "stratified", gen) for _ in range(n)]))
        w = p.weight(g)
        f = amp * torch.sigmoid(g - 2) * (1 + 0.3 * torch.randn(n, j, generator=gen, dtype=F64))
        folds = est.crossfit_folds(n, 2, torch.Generator().manual_seed(r))
        base = est.CurveControl(g, w, folds, knots, f).baseline(lambda v: v) if control else None
        e = est.integral(w, f, stratum_groups(j, "stratified"), base)
        vals.append(e.per_image)
        var.append(e.mc_var)
    sp = torch.nn.functional.softplus
    exact = amp[:, 0] * (sp(torch.tensor(12.8 - 2, dtype=F64)) - sp(torch.tensor(-6.8 - 2, dtype=F64)))
    return torch.stack(vals), torch.stack(var), exact


def test_the_mean_curve_control_is_unbiased_calibrated_and_shrinks_the_error() -> None:
    """Against the closed-form integral of a sigmoid curve: no bias, reported variance = spread, 3× less of it."""
    vals, var, exact = _sigmoid_runs(150, control=True)
    plain, _, _ = _sigmoid_runs(150, control=False)
    spread = vals.var(0)
    assert float(((vals.mean(0) - exact) / (spread / 150).sqrt()).abs().max()) < 4.5
    assert float(spread.mean() / var.mean()) == pytest.approx(1.0, abs=0.15)
    assert float(spread.mean()) < float(plain.var(0).mean()) / 3


def test_a_folds_mean_curve_is_fitted_on_the_other_fold_alone() -> None:
    gen = torch.Generator().manual_seed(2)
    g = torch.rand(40, 6, generator=gen, dtype=F64) * 10 - 4
    own = torch.sigmoid(g) + 0.1 * torch.randn(40, 6, generator=gen, dtype=F64)
    folds = est.crossfit_folds(40, 2, torch.Generator().manual_seed(0))
    knots = torch.linspace(-4, 6, 5, dtype=F64)
    before = est.CurveControl(g, torch.ones_like(g), folds, knots, own).baseline(lambda v: v)
    changed = torch.where((folds == 0)[:, None], own + 5.0, own)
    after = est.CurveControl(g, torch.ones_like(g), folds, knots, changed).baseline(lambda v: v)
    assert torch.equal(before[0][folds == 0], after[0][folds == 0])
    assert torch.equal(before[1][folds == 0], after[1][folds == 0])
    assert not torch.allclose(before[0][folds == 1], after[0][folds == 1])
