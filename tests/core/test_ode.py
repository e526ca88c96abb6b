"""The probability-flow ODE likelihood against closed-form Gaussian and Gaussian-mixture densities from scipy."""

import math

import numpy as np
import pytest
import torch
from mixtures import MixtureDenoiser
from scipy import special, stats

from itdcli.core.ode import FlowLikelihood, SolverError, flow_log_density
from itdcli.errors import ItdOptionError

F64 = torch.float64
LO = -30.0  # low enough that N(0, I) is the marginal to ~e^{γ/2} = 3e-7 (the mean shift is O(a), not O(a²))


class GaussianDenoiser:
    """Exact ε̂(z, γ) = b (a²Σ + b²I)⁻¹ (z − a μ) of x ~ N(μ, Σ), written here in closed form."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        self.mean, self.cov = mean.to(F64), cov.to(F64)

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        g = logsnr.to(F64).reshape(-1, 1, 1)
        a2, b2 = torch.sigmoid(g), torch.sigmoid(-g)
        marginal = a2 * self.cov + b2 * torch.eye(self.cov.shape[0], dtype=F64)
        centred = z.to(F64) - a2[:, 0].sqrt() * self.mean
        solved = torch.linalg.solve(marginal, centred.unsqueeze(-1)).squeeze(-1)
        return (b2[:, 0].sqrt() * solved).to(z.dtype)


class Counting:
    """Counts the calls of a denoiser, as the test's own NFE."""

    def __init__(self, denoiser: GaussianDenoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.denoiser(z, logsnr)


def _gaussian(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random mean and a full random SPD covariance with spread-out eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.exp(torch.linspace(-3.0, 1.0, d, dtype=F64))
    return 0.7 * torch.randn(d, generator=g, dtype=F64), q @ torch.diag(lam) @ q.T


def _points(mean: torch.Tensor, cov: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Float32 points from N(μ, 2Σ): typical ones and some in the tails."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, mean.shape[0], generator=g, dtype=F64)
    return (mean + math.sqrt(2.0) * noise @ torch.linalg.cholesky(cov).T).float()


def _exact_gaussian(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, logsnr_hi: float) -> np.ndarray:
    """log N(x; μ, Σ + e^{−γ_hi} I), the density of z_hi/a_hi, from scipy."""
    smoothed = cov.numpy() + math.exp(-logsnr_hi) * np.eye(cov.shape[0])
    return np.asarray(stats.multivariate_normal(mean.numpy(), smoothed).logpdf(x.double().numpy()))


def _marginal_prior(mean: torch.Tensor, cov: torch.Tensor, logsnr: float) -> "torch.distributions.MultivariateNormal":
    """The exact law of z_γ = a x + b ε for x ~ N(μ, Σ): N(a μ, a²Σ + b²I)."""
    a2 = 1.0 / (1.0 + math.exp(-logsnr))
    return torch.distributions.MultivariateNormal(math.sqrt(a2) * mean, a2 * cov + (1 - a2) * torch.eye(cov.shape[0]))


@pytest.mark.parametrize(("d", "logsnr_hi"), [(4, 2.0), (6, 10.0), (8, 6.0)])
def test_exact_divergence_gives_the_gaussian_density(d: int, logsnr_hi: float) -> None:
    mean, cov = _gaussian(d, seed=d)
    x = _points(mean, cov, 48, seed=1)
    out = flow_log_density(GaussianDenoiser(mean, cov), x, logsnr_hi, LO, probes=None, rtol=1e-7, atol=1e-7)
    assert isinstance(out, FlowLikelihood)
    assert out.log_density.shape == (48,) and out.log_density.dtype == F64
    assert (out.logsnr_lo, out.logsnr_hi) == (LO, logsnr_hi)
    assert bool((out.probe_se == 0).all())
    np.testing.assert_allclose(out.log_density.numpy(), _exact_gaussian(x, mean, cov, logsnr_hi), rtol=1e-5, atol=1e-5)


def test_default_tolerances_reach_1e_4_relative() -> None:
    mean, cov = _gaussian(5, seed=2)
    x = _points(mean, cov, 32, seed=3)
    out = flow_log_density(GaussianDenoiser(mean, cov), x, 8.0, LO, probes=None)
    np.testing.assert_allclose(out.log_density.numpy(), _exact_gaussian(x, mean, cov, 8.0), rtol=1e-4)


def test_the_prior_callable_is_what_closes_the_integral() -> None:
    mean, cov = _gaussian(5, seed=4)
    x, lo, hi = _points(mean, cov, 32, seed=5), -2.0, 6.0
    exact, den = _exact_gaussian(x, mean, cov, hi), GaussianDenoiser(mean, cov)
    seen: list[torch.Tensor] = []

    def prior(z: torch.Tensor) -> torch.Tensor:
        seen.append(z)
        return _marginal_prior(mean, cov, lo).log_prob(z.to(F64))

    matched = flow_log_density(den, x, hi, lo, probes=None, rtol=1e-7, atol=1e-7, prior=prior)
    np.testing.assert_allclose(matched.log_density.numpy(), exact, rtol=1e-5, atol=1e-5)
    assert len(seen) == 1 and seen[0].shape == x.shape
    standard = flow_log_density(den, x, hi, lo, probes=None, rtol=1e-7, atol=1e-7)
    assert float(np.abs(standard.log_density.numpy() - exact).mean()) > 0.05  # N(0, I) is wrong at γ = −2


def _pooled_bias(err: np.ndarray, se: np.ndarray) -> float:
    """Mean error over images in units of its own standard error, √(Σ se²)/N."""
    return float(err.mean() / (np.sqrt((se**2).sum()) / err.size))


def test_hutchinson_standard_errors_are_calibrated() -> None:
    # P = 16 and d = 12 rather than P = 8 and d ≤ 8: (est − exact)/se is at best Student t with P − 1 degrees of
    # freedom (sd 1.18 and P(|t| > 2) = 0.086 for P = 8, too close to the bounds), and Rademacher quadratic forms
    # in few dimensions take few distinct values, which fattens its tails further.
    mean, cov = _gaussian(12, seed=6)
    x, hi = _points(mean, cov, 400, seed=7), 6.0
    gen = torch.Generator().manual_seed(0)
    out = flow_log_density(GaussianDenoiser(mean, cov), x, hi, LO, probes=16, generator=gen)
    err, se = out.log_density.numpy() - _exact_gaussian(x, mean, cov, hi), out.probe_se.numpy()
    assert bool((out.probe_se > 0).all())
    z = err / se
    assert 0.7 <= float(z.std()) <= 1.3
    assert float((np.abs(z) > 2).mean()) <= 0.1
    assert abs(_pooled_bias(err, se)) < 4  # unbiased beyond the probe noise


def test_probes_are_reproducible_from_the_generator() -> None:
    mean, cov = _gaussian(4, seed=8)
    x, den = _points(mean, cov, 8, seed=9), GaussianDenoiser(mean, cov)
    runs = [flow_log_density(den, x, 6.0, -10.0, probes=4, generator=torch.Generator().manual_seed(3)) for _ in "ab"]
    torch.testing.assert_close(runs[0].log_density, runs[1].log_density, rtol=0, atol=0)
    other = flow_log_density(den, x, 6.0, -10.0, probes=4, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other.log_density, runs[0].log_density)


def _mixture() -> MixtureDenoiser:
    """Three well-separated diagonal Gaussian components in d = 4."""
    g = torch.Generator().manual_seed(10)
    means = torch.tensor([[-0.6, 0.4, 0.0, 0.3], [0.5, -0.5, 0.4, -0.2], [0.2, 0.6, -0.6, 0.1]], dtype=F64)
    variances = 0.02 + 0.1 * torch.rand(3, 4, generator=g, dtype=F64)
    return MixtureDenoiser(means, variances, torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def _exact_mixture(mix: MixtureDenoiser, x: torch.Tensor, logsnr_hi: float) -> np.ndarray:
    """log Σ_k π_k N(x; m_k, diag(v_k + e^{−γ_hi})) from scipy."""
    xs, s2 = x.double().numpy(), math.exp(-logsnr_hi)
    comps = [
        stats.multivariate_normal(m.numpy(), np.diag(v.numpy() + s2)).logpdf(xs)
        for m, v in zip(mix.means, mix.variances, strict=True)
    ]
    return np.asarray(special.logsumexp(np.stack(comps, 1), axis=1, b=mix.log_w.exp().numpy()))


def test_mixture_density_exact_and_with_probes() -> None:
    mix, hi = _mixture(), 7.0
    x = mix.sample(48, torch.Generator().manual_seed(11)).float()
    exact = _exact_mixture(mix, x, hi)
    full = flow_log_density(mix, x, hi, LO, probes=None, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(full.log_density.numpy(), exact, rtol=1e-5, atol=1e-4)
    probed = flow_log_density(mix, x, hi, LO, probes=16, generator=torch.Generator().manual_seed(1))
    err, se = probed.log_density.numpy() - exact, probed.probe_se.numpy()
    assert int((np.abs(err) > 3 * se + 1e-3).sum()) <= 3  # d = 4 makes se from 16 probes heavy-tailed: allow a few
    assert abs(_pooled_bias(err, se)) < 4


def test_nfe_counts_denoiser_calls_and_grows_with_tighter_tolerance() -> None:
    mean, cov = _gaussian(4, seed=12)
    x = _points(mean, cov, 6, seed=13)
    nfe = []
    for tol in (1e-3, 1e-8):
        counted = Counting(GaussianDenoiser(mean, cov))
        out = flow_log_density(counted, x, 6.0, LO, probes=2, rtol=tol, atol=tol)
        assert out.nfe == counted.calls > 0
        nfe.append(out.nfe)
    assert nfe[1] > nfe[0]


def test_a_batch_solves_each_image_as_alone() -> None:
    mean, cov = _gaussian(4, seed=14)
    x, den = _points(mean, cov, 8, seed=15), GaussianDenoiser(mean, cov)
    batch = flow_log_density(den, x, 6.0, LO, probes=None, rtol=1e-7, atol=1e-7)
    alone = flow_log_density(den, x[3:4], 6.0, LO, probes=None, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(batch.log_density[3:4], alone.log_density, rtol=1e-6, atol=1e-5)


def test_works_under_no_grad_and_inference_mode() -> None:
    mean, cov = _gaussian(4, seed=16)
    x, den = _points(mean, cov, 4, seed=17), GaussianDenoiser(mean, cov)
    free = flow_log_density(den, x, 6.0, -10.0, probes=None).log_density
    with torch.no_grad():
        torch.testing.assert_close(flow_log_density(den, x, 6.0, -10.0, probes=None).log_density, free)
    with torch.inference_mode():
        torch.testing.assert_close(flow_log_density(den, x, 6.0, -10.0, probes=None).log_density, free)


def _one_line(err: pytest.ExceptionInfo[SolverError]) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def test_nan_denoiser_names_the_logsnr_reached() -> None:
    mean, cov = _gaussian(4, seed=18)
    den = GaussianDenoiser(mean, cov)

    def broken(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        out = den(z, logsnr)
        return out * math.nan if float(logsnr[0]) < 1.5 else out

    with pytest.raises(SolverError) as err:
        flow_log_density(broken, _points(mean, cov, 4, seed=19), 6.0, LO, probes=None)
    message = _one_line(err)
    assert 1.5 - 4.0 < err.value.logsnr_reached < 1.5
    assert "non-finite" in message and f"logSNR {err.value.logsnr_reached:.3g}" in message


@pytest.mark.parametrize("how", ["no_grad", "numpy"])
def test_non_differentiable_denoiser_is_refused(how: str) -> None:
    mean, cov = _gaussian(4, seed=20)
    den = GaussianDenoiser(mean, cov)

    def opaque(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        if how == "numpy":
            return torch.from_numpy(den(z.detach(), logsnr).numpy())
        with torch.no_grad():
            return den(z, logsnr)

    with pytest.raises(SolverError) as err:
        flow_log_density(opaque, _points(mean, cov, 3, seed=21), 6.0, LO, probes=2)
    assert "not differentiable" in _one_line(err)
    assert err.value.logsnr_reached == 6.0


def test_step_budget_exhausted_is_a_solver_error() -> None:
    mean, cov = _gaussian(4, seed=22)
    with pytest.raises(SolverError) as err:
        flow_log_density(GaussianDenoiser(mean, cov), _points(mean, cov, 3, seed=23), 6.0, LO, probes=None, max_steps=3)
    message = _one_line(err)
    assert "did not converge" in message and "[-30, 6]" in message
    assert LO < err.value.logsnr_reached < 6.0


def test_a_singular_field_underflows_the_step_and_names_where() -> None:
    # ε̂ = z / (b (γ − 1)) makes z/a grow like |γ − 1|^{−1/2}: dopri5 shrinks its step to nothing at γ = 1
    def singular(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        g = logsnr.to(F64).reshape(-1, 1)
        return (z.to(F64) / (torch.sigmoid(-g).sqrt() * (g - 1.0))).to(z.dtype)

    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(24))
    with pytest.raises(SolverError) as err:
        flow_log_density(singular, x, 6.0, -10.0, probes=None)
    assert "did not converge" in _one_line(err)
    assert err.value.logsnr_reached == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"probes": 1}, "probes"), ({"method": "euler"}, "method"), ({"logsnr_lo": 7.0}, "logsnr")],
)
def test_bad_options_are_refused(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"logsnr_hi": 6.0, "logsnr_lo": -10.0, **kwargs}
    with pytest.raises(ItdOptionError) as err:
        flow_log_density(lambda z, g: z * 1.0, torch.zeros(2, 3), **args)  # type: ignore[arg-type]
    assert err.value.field == field


def test_a_prior_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ItdOptionError) as err:
        flow_log_density(lambda z, g: z * 1.0, torch.zeros(2, 3), 6.0, -10.0, probes=None, prior=lambda z: z)
    assert err.value.field == "prior"
