"""The Gaussian reference against scipy, quadrature and Monte Carlo (spec §4–§6)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from itdcli.core import channel
from itdcli.core.gaussian import GaussianReference, mmse_gaussian

F64 = torch.float64


def _reference(d: int = 5, seed: int = 0) -> GaussianReference:
    """A random full-rank N(μ, Σ) built from its spectrum."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.exp(torch.linspace(-4, 1.5, d, dtype=F64))
    return GaussianReference(torch.randn(d, generator=g, dtype=F64), q, lam)


def _cov(ref: GaussianReference) -> np.ndarray:
    return (ref.eigvecs @ torch.diag(ref.eigvals) @ ref.eigvecs.T).numpy()


def test_fit_recovers_sample_mean_and_unbiased_covariance() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 4, generator=g, dtype=F64) @ torch.randn(4, 4, generator=g, dtype=F64)
    ref = GaussianReference.fit(x)
    np.testing.assert_allclose(ref.mean.numpy(), x.mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(_cov(ref), np.cov(x.numpy(), rowvar=False), atol=1e-10)


def test_fit_floors_the_spectrum_of_rank_deficient_data() -> None:
    x = torch.zeros(50, 3, dtype=F64)
    x[:, 0] = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = GaussianReference.fit(x, floor=1e-3)
    assert float(ref.eigvals.min()) == pytest.approx(1e-3)
    assert math.isfinite(ref.entropy())


def test_entropy_and_nll_match_scipy() -> None:
    ref = _reference()
    mvn = stats.multivariate_normal(ref.mean.numpy(), _cov(ref))
    assert ref.entropy() == pytest.approx(mvn.entropy(), rel=1e-10)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    np.testing.assert_allclose(ref.nll(x).numpy(), -mvn.logpdf(x.numpy()), rtol=1e-10)


def test_expected_mmse_is_sum_of_sigmoids_and_tends_to_0_and_d() -> None:
    ref = _reference()
    g = torch.tensor([-40.0, 0.0, 40.0], dtype=F64)
    m = ref.mmse(g)
    assert float(m[0]) < 1e-12
    assert float(m[2]) == pytest.approx(5.0)
    torch.testing.assert_close(m[1], (ref.eigvals / (1 + ref.eigvals)).sum())
    torch.testing.assert_close(mmse_gaussian(g, ref.eigvals), m)


def test_pointwise_mmse_matches_monte_carlo_of_the_linear_denoiser() -> None:
    ref = _reference()
    x = ref.mean + torch.tensor([0.3, -1.0, 0.5, 2.0, -0.2], dtype=F64)
    g = torch.Generator().manual_seed(2)
    for gamma in (-2.0, 1.0, 4.0):
        eps = torch.randn(200_000, 5, generator=g, dtype=F64)
        logsnr = torch.full((eps.shape[0],), gamma, dtype=F64)
        z = channel.noisy(x.expand_as(eps), eps, logsnr)
        errs = ((eps - ref.eps_hat(z, logsnr)) ** 2).sum(1)
        exact = ref.mmse_pointwise(ref.whiten(x[None]), torch.tensor([gamma], dtype=F64))
        se = errs.std() / math.sqrt(errs.numel())
        assert abs(float(errs.mean() - exact)) < 4 * float(se)


def test_pointwise_mmse_averages_to_expected_mmse_over_the_gaussian() -> None:
    ref = _reference()
    y = torch.randn(400_000, 5, generator=torch.Generator().manual_seed(4), dtype=F64) * ref.eigvals.sqrt()
    for gamma in (-3.0, 0.5, 3.0):
        vals = ref.mmse_pointwise(y, torch.tensor(gamma, dtype=F64))
        assert float(vals.mean()) == pytest.approx(float(ref.mmse(torch.tensor(gamma))), rel=5e-3)


def test_eps_hat_agrees_with_the_x_hat_form_of_the_posterior_mean() -> None:
    ref = _reference()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 5, generator=g, dtype=F64)
    logsnr = torch.linspace(-3, 5, 6, dtype=F64)
    a, b = channel.gains(logsnr)
    cov = torch.tensor(_cov(ref))
    xh = torch.stack(
        [
            ref.mean
            + a[i]
            * cov
            @ torch.linalg.solve(a[i] ** 2 * cov + b[i] ** 2 * torch.eye(5, dtype=F64), z[i] - a[i] * ref.mean)
            for i in range(6)
        ]
    )
    torch.testing.assert_close(channel.x_hat(z, ref.eps_hat(z, logsnr), logsnr), xh)


def test_pointwise_identity_integral_equals_nll_minus_entropy() -> None:
    """½ ∫ (mmse_G(x, γ) − mmse_G(γ)) dγ = −log N(x) − H_G (spec §4, derived), by quadrature."""
    ref = _reference()
    x = ref.mean[None] + torch.tensor([[1.0, -0.5, 0.2, 0.9, -1.3]], dtype=F64)
    y = ref.whiten(x)

    def gap(gamma: float) -> float:
        g = torch.tensor([gamma], dtype=F64)
        return float(ref.mmse_pointwise(y, g) - ref.mmse(g))

    value, _ = integrate.quad(gap, -60, 60, limit=400)
    assert 0.5 * value == pytest.approx(float(ref.nll(x)) - ref.entropy(), rel=1e-7)


def test_left_tails_match_quadrature() -> None:
    ref = _reference()
    y = ref.whiten(ref.mean[None] + torch.tensor([[0.4, 0.1, -2.0, 0.0, 0.7]], dtype=F64))
    lo = -1.5
    expected, _ = integrate.quad(lambda t: float(ref.mmse(torch.tensor(t))), -80, lo)
    pointwise, _ = integrate.quad(lambda t: float(ref.mmse_pointwise(y, torch.tensor([t], dtype=F64))), -80, lo)
    assert float(ref.left_tail(lo)) == pytest.approx(0.5 * expected, rel=1e-8)
    assert float(ref.left_tail(lo, y)) == pytest.approx(0.5 * pointwise, rel=1e-8)


def test_error_of_one_draw_is_the_linear_denoisers_error_and_averages_to_the_pointwise_mmse() -> None:
    """error_draw(y, Uᵀε, γ) = ‖ε − ε̂_G(z)‖² for the same ε (via eps_hat), and its mean over ε is mmse_pointwise."""
    ref = _reference(d=5, seed=3)
    gen = torch.Generator().manual_seed(7)
    x = ref.mean + torch.randn(1, 5, generator=gen, dtype=torch.float64) * 2
    for g in (-3.0, 0.5, 6.0):
        logsnr = torch.full((20_000,), g, dtype=torch.float64)
        eps = torch.randn(20_000, 5, generator=gen, dtype=torch.float64)
        z = channel.noisy(x.expand(20_000, 5), eps, logsnr)
        direct = ((eps - ref.eps_hat(z, logsnr)) ** 2).sum(1)
        draws = ref.error_draw(ref.whiten(x).expand(20_000, 5), eps @ ref.eigvecs, logsnr)
        assert torch.allclose(draws, direct, rtol=1e-9, atol=1e-9)
        se = float(draws.std()) / math.sqrt(20_000)
        assert abs(float(draws.mean()) - float(ref.mmse_pointwise(ref.whiten(x), torch.tensor(g)))) < 4 * se
