"""The truncated-logistic and uniform proposals: inverse CDF, density and importance weights (spec §6.2)."""

import itertools
import math

import pytest
import torch
from scipy import integrate

from itdcli.core.proposal import (
    MOMENT_SCALE_CONSTANT,
    PAPER_SCALE_CONSTANT,
    Proposal,
    cdf_points,
    fit_adaptive,
    logistic_from_spectrum,
    stratum_groups,
)

F64 = torch.float64
PROPOSALS = [
    Proposal("logistic", 6.26, 3.10, -6.13, 18.65),
    Proposal("logistic", 3.0, 2.0, -1.0, 9.0),
    Proposal("uniform", 0.0, 1.0, -4.0, 7.0),
    Proposal("adaptive", 3.0, 2.0, -1.0, 9.0, (-1.0, 0.5, 4.0, 9.0), (0.2, 0.5, 0.3)),
]


def test_cifar_reference_constants_give_the_spec_range_and_weights() -> None:
    """With loc 6.261364 and scale 3.097625, clip 4 gives [−6.129134, 18.651862], w 11.945 … 169.068."""
    p = Proposal("logistic", 6.261363983154297, 3.0976245403289795, 0, 1)
    lo, hi = p.loc - 4 * p.scale, p.loc + 4 * p.scale
    p = Proposal("logistic", p.loc, p.scale, lo, hi)
    assert (lo, hi) == pytest.approx((-6.129134, 18.651862), abs=1e-6)
    w = p.weight(torch.tensor([p.loc, hi], dtype=F64))
    assert w.tolist() == pytest.approx([11.945, 169.068], abs=1e-3)


def test_scale_from_spectrum_follows_both_constants() -> None:
    log_lam = torch.linspace(-5, 1, 11, dtype=F64)
    var = float(log_lam.var())
    for c in (PAPER_SCALE_CONSTANT, MOMENT_SCALE_CONSTANT):
        p = logistic_from_spectrum(log_lam, c, clip=4)
        assert p.loc == pytest.approx(2.0)
        assert p.scale == pytest.approx(math.sqrt(1 + c * var))
        assert (p.logsnr_min, p.logsnr_max) == pytest.approx((2 - 4 * p.scale, 2 + 4 * p.scale))


def _pieces(p: Proposal) -> list[tuple[float, float]]:
    """Intervals on which the density is smooth: the bins of an adaptive proposal, else the whole range."""
    edges = p.edges or (p.logsnr_min, p.logsnr_max)
    return list(itertools.pairwise(edges))


@pytest.mark.parametrize("p", PROPOSALS)
def test_density_integrates_to_one_and_icdf_hits_the_ends(p: Proposal) -> None:
    # piece by piece: an adaptive density jumps at its bin edges
    total = sum(integrate.quad(lambda g: float(p.density(torch.tensor(g))), a, b)[0] for a, b in _pieces(p))
    assert total == pytest.approx(1.0, rel=1e-7)
    ends = p.icdf(torch.tensor([0.0, 1.0], dtype=F64))
    assert ends.tolist() == pytest.approx([p.logsnr_min, p.logsnr_max], abs=1e-9)


@pytest.mark.parametrize("p", PROPOSALS)
def test_icdf_is_the_inverse_of_the_integrated_density(p: Proposal) -> None:
    for u in (0.1, 0.5, 0.9):
        g = float(p.icdf(torch.tensor(u, dtype=F64)))
        pieces = [(a, min(b, g)) for a, b in _pieces(p) if a < g]
        mass = sum(integrate.quad(lambda t: float(p.density(torch.tensor(t))), a, b)[0] for a, b in pieces)
        assert mass == pytest.approx(u, rel=1e-8)


@pytest.mark.parametrize("p", PROPOSALS)
def test_importance_weights_integrate_known_functions_over_the_range(p: Proposal) -> None:
    """E_p[w f] = ∫ f dγ on the truncated range for f = 1, γ, σ(γ) (closed forms)."""
    lo, hi = p.logsnr_min, p.logsnr_max
    exact = {
        "one": hi - lo,
        "linear": (hi**2 - lo**2) / 2,
        "sigmoid": math.log1p(math.exp(hi)) - math.log1p(math.exp(lo)),
    }
    funcs = {"one": torch.ones_like, "linear": lambda g: g, "sigmoid": torch.sigmoid}
    gen = torch.Generator().manual_seed(0)
    g = p.icdf(cdf_points(20_000, "stratified", gen))
    w = p.weight(g)
    for name, f in funcs.items():
        assert float((w * f(g)).mean()) == pytest.approx(exact[name], rel=1e-4)
    iid = p.icdf(cdf_points(200_000, "iid", gen))
    vals = p.weight(iid) * torch.sigmoid(iid)
    se = float(vals.std()) / math.sqrt(vals.numel())
    assert abs(float(vals.mean()) - exact["sigmoid"]) < 4 * se


def test_point_schemes() -> None:
    gen = torch.Generator().manual_seed(1)
    strat = cdf_points(50, "stratified", gen)
    pair = (torch.arange(50) // 2).to(F64)
    assert bool(((strat >= pair / 25) & (strat < (pair + 1) / 25)).all())  # two points in each of 25 strata
    odd = cdf_points(5, "stratified", gen)
    assert bool((odd[:4] < 0.8).all()) and float(odd[4]) >= 0.8  # the odd last point has the last fifth
    assert bool(((odd[:4] >= torch.tensor([0, 0, 0.4, 0.4])) & (odd[:4] < torch.tensor([0.4, 0.4, 0.8, 0.8]))).all())
    iid = cdf_points(50, "iid", gen)
    assert bool((iid.diff() >= 0).all()) and float(iid.min()) >= 0 and float(iid.max()) < 1


def test_empty_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty logSNR range"):
        Proposal("uniform", 0, 1, 3.0, 3.0)


def test_adaptive_fit_follows_the_spread_of_the_integrand_about_its_bin_means() -> None:
    """f = 10 below γ = 4 (large but constant: strata leave nothing of it) and ±3 above: all the optimal mass goes
    above, the base keeps its defensive share."""
    base = Proposal("uniform", 0.0, 1.0, 0.0, 8.0)
    g = base.icdf(cdf_points(4000, "stratified", torch.Generator().manual_seed(0)))
    f = torch.where(g > 4, 3.0 * torch.sign(torch.randn(g.shape, generator=torch.Generator().manual_seed(1))), 10.0)
    p = fit_adaptive(base, g, [f], bins=8, defensive=0.2)
    assert p.edges == pytest.approx(tuple(range(9)))
    assert p.mass == pytest.approx((0.025,) * 4 + (0.225,) * 4, rel=1e-3)
    # two integrands share the optimal mass equally; one without spread anywhere keeps the base proposal
    both = fit_adaptive(base, g, [f, torch.ones_like(g)], bins=8, defensive=0.0)
    assert both.mass == pytest.approx((1 / 16,) * 4 + (3 / 16,) * 4, rel=1e-3)


def test_adaptive_weights_are_unbiased_for_an_integral() -> None:
    """E_p[w f] = ∫ f dγ also under a fitted proposal (checked against the closed form of ∫ σ(γ))."""
    base = Proposal("logistic", 3.0, 2.0, -1.0, 9.0)
    g = base.icdf(cdf_points(2000, "stratified", torch.Generator().manual_seed(2)))
    p = fit_adaptive(base, g, [torch.sigmoid(g)])
    x = p.icdf(cdf_points(50_000, "stratified", torch.Generator().manual_seed(3)))
    exact = math.log1p(math.exp(9.0)) - math.log1p(math.exp(-1.0))
    assert float((p.weight(x) * torch.sigmoid(x)).mean()) == pytest.approx(exact, rel=1e-4)


def test_variance_groups_pair_strata() -> None:
    assert stratum_groups(6, "stratified").tolist() == [0, 0, 1, 1, 2, 2]
    assert stratum_groups(5, "stratified").tolist() == [0, 0, 1, 1, 1]
    assert stratum_groups(4, "iid").tolist() == [0, 0, 0, 0]
