"""The two solver likelihoods beside the I-MMSE estimators, `vlb` and `ode`, against ground truth written here.

Ground truth never comes from itdcli: Gaussian and mixture densities from scipy or `tests/mixtures.py`, the
variational bound's expectation from a numpy transcription of Ho et al. (2020) with the clipped-normal moments
in closed form, the entropy of a discrete law, the schedules from diffusers or improved-diffusion's formula.
"""

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clirun import run
from mixtures import MixtureDenoiser
from scipy import integrate, stats
from standins import save_ddpm, save_iddpm, write_cifar

from itdcli import paths
from itdcli.api.nll import nll
from itdcli.core.gaussian import GaussianReference
from itdcli.errors import ItdError
from itdcli.models.base import DiscreteTime

F64 = torch.float64
LN2 = math.log(2)


def _bpd(nats: Any, dim: int) -> Any:
    return nats / (dim * LN2)


def _per_image(result: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image bits/dim and their Monte Carlo standard errors, in the order of the scored images."""
    return result.arrays[f"bpd/{name}"].numpy(), result.arrays[f"se/{name}"].numpy()


# ---------------------------------------------------------------- exact denoisers written here


class GaussianDenoiser:
    """ε̂*(z, γ) = b (a²Σ + b²I)⁻¹ (z − aμ) of x ~ N(μ, Σ), differentiable in z."""

    def __init__(self, mean: np.ndarray, cov: np.ndarray) -> None:
        self.mean, self.cov = torch.tensor(mean, dtype=F64), torch.tensor(cov, dtype=F64)

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        g = logsnr.to(F64).reshape(-1, 1, 1)
        a2, b2 = torch.sigmoid(g), torch.sigmoid(-g)
        marginal = a2 * self.cov + b2 * torch.eye(len(self.mean), dtype=F64)
        centred = z.reshape(z.shape[0], -1).to(F64) - a2[:, 0].sqrt() * self.mean
        eps = b2[:, 0].sqrt() * torch.linalg.solve(marginal, centred.unsqueeze(-1)).squeeze(-1)
        return eps.reshape(z.shape).to(z.dtype)


class Shrink:
    """ε̂ = b z / (a² s² + b²), the posterior-mean denoiser of N(0, s² I) applied elementwise (x̂ = k z)."""

    s2 = 0.3

    def __init__(self, schedule: DiscreteTime | None = None) -> None:
        if schedule is not None:
            self.discrete_time = schedule

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        g = logsnr.to(F64).reshape(-1, *([1] * (z.dim() - 1)))
        a2, b2 = torch.sigmoid(g), torch.sigmoid(-g)
        return (b2.sqrt() * z.to(F64) / (a2 * self.s2 + b2)).to(z.dtype)


def _spd(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random mean and a random SPD covariance with eigenvalues spread over about two decades."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.exp(rng.uniform(np.log(0.02), np.log(1.5), size=d))
    return rng.normal(size=d) * 0.3, q @ np.diag(lam) @ q.T


def _reference(mean: np.ndarray, cov: np.ndarray) -> GaussianReference:
    lam, vecs = np.linalg.eigh(cov)
    return GaussianReference(torch.tensor(mean), torch.tensor(vecs), torch.tensor(lam))


def _gaussian_nll(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    return -stats.multivariate_normal(mean, cov).logpdf(x)


# ---------------------------------------------------------------- 1. Gaussian data, exact denoiser


EXACT_BPD = 2e-3  # per image: what dopri5 at rtol = atol = 1e-5 may leave with the exact trace


@pytest.mark.parametrize(
    ("shape", "logsnr_max", "probes"), [((1, 2, 2), None, 64), ((1, 2, 4), 3.0, 64), ((1, 2, 4), 3.0, 4)]
)
def test_ode_of_gaussian_data_is_the_gaussian_density_at_the_top_logsnr(
    shape: tuple[int, int, int], logsnr_max: float | None, probes: int
) -> None:
    """−log p(x) = −log N(x; μ, Σ + e^{−γ_R} I); γ_R = 3 makes the e^{−γ_R} I visible.

    With d ≤ probes the divergence is the exact trace: every image matches up to the solver's tolerance and
    no error is claimed; with 4 probes for d = 8, Hutchinson: the mean within 3 of its standard errors.
    """
    d = math.prod(shape)
    mean, cov = _spd(d, seed=d)
    x = np.random.default_rng(1).multivariate_normal(mean, cov, size=40)
    data = torch.tensor(x, dtype=torch.float32).reshape(-1, *shape)
    extra = {} if logsnr_max is None else {"logsnr_max": logsnr_max}
    r = nll(data, GaussianDenoiser(mean, cov), reference=_reference(mean, cov), estimator="ode", probes=probes,
            device="cpu", save=False, **extra)  # fmt: skip
    top = r.proposal.logsnr_max
    assert logsnr_max is None or top == logsnr_max
    xs = data.double().reshape(-1, d).numpy()
    exact = _bpd(_gaussian_nll(xs, mean, cov + math.exp(-top) * np.eye(d)), d)
    bpd, _ = _per_image(r, "ode")
    e, details = r.estimates["ode"], r.solvers["ode"].details
    assert e.stderr_bpd is not None
    if d <= probes:
        assert details["probes"] == "exact trace (d ≤ probes)" and e.stderr_bpd == 0
        assert float(np.abs(bpd - exact).max()) < EXACT_BPD, np.abs(bpd - exact).max()
    else:
        assert details["probes"] == probes and e.stderr_bpd > 0
        assert abs(e.bpd - exact.mean()) <= 3 * e.stderr_bpd, (e.bpd, exact.mean(), e.stderr_bpd)
    if logsnr_max is not None and d <= probes:  # the smoothing is resolved: the unsmoothed density is far off
        plain = _bpd(_gaussian_nll(xs, mean, cov), d).mean()
        assert abs(e.bpd - plain) > 5 * EXACT_BPD
    assert details["dequantization_draws"] == 1
    assert r.solvers["ode"].evals_per_image > 0


def test_ode_agrees_with_the_continuous_immse_estimate_for_the_exact_denoiser() -> None:
    """One flow, two routes: with ε̂* the ODE and the I-MMSE continuous estimate give the same −log p(x)."""
    d = 4
    mean, cov = _spd(d, seed=7)
    x = np.random.default_rng(2).multivariate_normal(mean, cov, size=32)
    data = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 2, 2)
    r = nll(data, GaussianDenoiser(mean, cov), reference=_reference(mean, cov), estimator="all", probes=64,
            device="cpu", save=False)  # fmt: skip
    assert {"continuous", "continuous_pointwise", "ode"} <= set(r.estimates)
    assert not {"vlb", "discrete", "dequantized"} & set(r.estimates)  # float data: no discrete estimators
    ode, cont = r.estimates["ode"], r.estimates["continuous"]
    assert ode.stderr_bpd is not None and cont.stderr_bpd is not None
    combined = math.hypot(ode.stderr_bpd, cont.stderr_bpd)
    assert abs(ode.bpd - cont.bpd) <= 3 * combined, (ode.bpd, cont.bpd, combined)
    # and both are the data's density: the continuous estimate of N(μ, Σ) itself, within its tails' allowance
    exact = _bpd(_gaussian_nll(data.double().reshape(-1, d).numpy(), mean, cov), d).mean()
    assert abs(cont.bpd - exact) <= 3 * cont.stderr_bpd + 2e-3, (cont.bpd, exact)


# ---------------------------------------------------------------- 2. Gaussian mixture, exact denoiser


def _mixture(d: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, d, generator=g, dtype=F64) * 0.6
    variances = torch.rand(3, d, generator=g, dtype=F64) * 0.1 + 0.02
    return means, variances, torch.tensor([0.5, 0.3, 0.2], dtype=F64)


def _mixture_reference(means: torch.Tensor, variances: torch.Tensor, w: torch.Tensor) -> GaussianReference:
    """N(μ, Σ) with the mixture's exact first two moments."""
    m = (w[:, None] * means).sum(0)
    second = (w[:, None, None] * (torch.diag_embed(variances) + means[:, :, None] * means[:, None, :])).sum(0)
    lam, vecs = torch.linalg.eigh(second - m[:, None] * m[None])
    return GaussianReference(m, vecs, lam)


@pytest.mark.parametrize("logsnr_max", [None, 3.0])
def test_ode_of_mixture_data_is_the_mixture_density_at_the_top_logsnr(logsnr_max: float | None) -> None:
    """x ~ Σ π_k N(m_k, diag v_k): the ODE gives −log of the mixture with variances v_k + e^{−γ_R}."""
    means, variances, w = _mixture()
    mix = MixtureDenoiser(means, variances, w)
    x = mix.sample(40, torch.Generator().manual_seed(4))
    data = x.to(torch.float32).reshape(-1, 1, 2, 2)
    extra = {} if logsnr_max is None else {"logsnr_max": logsnr_max}
    r = nll(data, mix, reference=_mixture_reference(means, variances, w), estimator="ode", probes=64,
            device="cpu", save=False, **extra)  # fmt: skip
    top = r.proposal.logsnr_max
    xs = data.double().reshape(-1, 4)
    exact = _bpd(MixtureDenoiser(means, variances + math.exp(-top), w).nll(xs).numpy(), 4)
    bpd, _ = _per_image(r, "ode")
    assert float(np.abs(bpd - exact).max()) < EXACT_BPD, np.abs(bpd - exact).max()  # d = 4 ≤ 64: exact trace
    e = r.estimates["ode"]
    if logsnr_max is not None:
        plain = _bpd(mix.nll(xs).numpy(), 4).mean()
        assert abs(e.bpd - plain) > 5 * EXACT_BPD


# ---------------------------------------------------------------- 3. the variational bound


def _linear_abar(steps: int) -> np.ndarray:
    """ᾱ of the linear β schedule 1e-4…0.02 rescaled to `steps` (improved-diffusion's scaling)."""
    scale = 1000 / steps
    return np.cumprod(1 - np.linspace(scale * 1e-4, scale * 0.02, steps))


def _truncated_powers(alpha: np.ndarray, beta: np.ndarray, top: int) -> list[np.ndarray]:
    """I_k = ∫_α^β εᵏ φ(ε) dε for k = 0..top, by I_k = (k−1) I_{k−2} + α^{k−1}φ(α) − β^{k−1}φ(β)."""
    pa, pb = stats.norm.pdf(alpha), stats.norm.pdf(beta)
    out = [stats.norm.cdf(beta) - stats.norm.cdf(alpha), pa - pb]
    for k in range(2, top + 1):
        out.append((k - 1) * out[k - 2] + alpha ** (k - 1) * pa - beta ** (k - 1) * pb)
    return out


def _clipped_moment(x0: float, m: np.ndarray, s: np.ndarray, n: int) -> np.ndarray:
    """E[(clip(m + sε, −1, 1) − x0)ⁿ] for ε ~ N(0, 1), in closed form."""
    alpha, beta = (-1 - m) / s, (1 - m) / s
    powers = _truncated_powers(alpha, beta, n)
    delta = m - x0
    middle = sum(math.comb(n, k) * delta ** (n - k) * s**k * powers[k] for k in range(n + 1))
    return stats.norm.cdf(alpha) * (-1 - x0) ** n + stats.norm.sf(beta) * (1 - x0) ** n + middle


class BoundTerms:
    """E and Var over the noise of every term of the bound for the `Shrink` model, per pixel value x0 (nats).

    Ho et al. (2020): x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε; the Shrink model's x̂0 = k_t x_t, k_t = √ᾱ s²/(ᾱ s² + 1 − ᾱ),
    clipped to [−1, 1]; μ_θ − μ̃ = c1_t (x̂0 − x0) with c1_t = √ᾱ_{t−1} β_t/(1 − ᾱ_t); q's variance β̃_t =
    β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t); p's variance β̃_t (fixed_small) or β_t (fixed_large), both β̃_1 at t = 0.
    So KL_t = ½(log σ_p²/β̃_t + β̃_t/σ_p² − 1) + c1_t² (x̂0 − x0)²/(2σ_p²), and the decoder at t = 0 is the
    discretized normal N(clip(x̂0), β̃_1) on `levels` bins with open end bins.
    """

    def __init__(self, abar: np.ndarray, variance: str, levels: int, s2: float = Shrink.s2) -> None:
        self.abar, self.levels, self.s2 = np.asarray(abar, dtype=float), levels, s2
        prev = np.concatenate([[1.0], self.abar[:-1]])
        beta = 1 - self.abar / prev
        self.tilde = beta * (1 - prev) / (1 - self.abar)
        self.c1 = np.sqrt(prev) * beta / (1 - self.abar)
        self.var_p = self.tilde.copy() if variance == "fixed_small" else beta.copy()
        self.var_p[0] = self.tilde[1]
        self.values = np.arange(levels) * 2 / (levels - 1) - 1

    def _xhat(self, t: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """x̂0 = k (a x0 + b ε): its slope on x0 and its noise scale."""
        a, b = np.sqrt(self.abar[t]), np.sqrt(1 - self.abar[t])
        k = a * self.s2 / (a * a * self.s2 + b * b)
        return k * a, k * b

    def steps(self, x0: float) -> tuple[np.ndarray, np.ndarray]:
        """E[KL_t] and Var[KL_t] for t = 1..T−1."""
        t = np.arange(1, len(self.abar))
        slope, s = self._xhat(t)
        vq, vp = self.tilde[t], self.var_p[t]
        scale = self.c1[t] ** 2 / (2 * vp)
        second, fourth = _clipped_moment(x0, slope * x0, s, 2), _clipped_moment(x0, slope * x0, s, 4)
        mean = 0.5 * (np.log(vp / vq) + vq / vp - 1) + scale * second
        return mean, scale**2 * (fourth - second**2)

    def _decoder_nll(self, x0: float, mu: float) -> float:
        sd, h = math.sqrt(self.var_p[0]), 1 / (self.levels - 1)
        if x0 < -1 + h / 2:
            return float(-stats.norm.logcdf((x0 + h - mu) / sd))
        if x0 > 1 - h / 2:
            return float(-stats.norm.logsf((x0 - h - mu) / sd))
        lo, hi = (x0 - h - mu) / sd, (x0 + h - mu) / sd
        if lo > 0:
            lo, hi = -hi, -lo
        big = stats.norm.logcdf(hi)
        return float(-(big + math.log1p(-math.exp(stats.norm.logcdf(lo) - big))))

    def decoder(self, x0: float) -> tuple[float, float]:
        """E and Var of −log N_disc(x0; clip(x̂0), β̃_1) at t = 0, the clipped ends as point masses."""
        slope, s = (float(v) for v in self._xhat(0))
        m = slope * x0
        alpha, beta = (-1 - m) / s, (1 - m) / s
        moments = []
        for power in (1, 2):
            inner = integrate.quad(
                lambda e, p=power: self._decoder_nll(x0, m + s * e) ** p * stats.norm.pdf(e),
                max(alpha, -12.0),
                min(beta, 12.0),
                limit=200,
            )[0]
            ends = [(stats.norm.cdf(alpha), -1.0), (stats.norm.sf(beta), 1.0)]
            moments.append(inner + sum(p * self._decoder_nll(x0, mu) ** power for p, mu in ends if p > 0))
        return moments[0], moments[1] - moments[0] ** 2

    def prior(self, x0: float) -> float:
        """KL(N(√ᾱ_{T−1} x0, 1 − ᾱ_{T−1}) ‖ N(0, 1))."""
        a = self.abar[-1]
        return 0.5 * (a * x0**2 + (1 - a) - 1 - math.log(1 - a))

    def per_value(self) -> dict[str, np.ndarray]:
        """Per level: the bound's expectation, the full loop's variance, and what adjacent pairs estimate."""
        out: dict[str, list[float]] = {"mean": [], "var": [], "pairs": [], "pairs_half": []}
        for x0 in self.values:
            mean, var = self.steps(float(x0))
            dec_mean, dec_var = self.decoder(float(x0))
            even = len(mean) - len(mean) % 2
            pm, pv = mean[:even].reshape(-1, 2), var[:even].reshape(-1, 2)
            pairs = float((pv.sum(1) + (pm[:, 0] - pm[:, 1]) ** 2).sum())  # E Σ (L_a − L_b)² over the pairs
            out["mean"].append(float(mean.sum()) + dec_mean + self.prior(float(x0)))
            out["var"].append(float(var.sum()) + dec_var / 2)  # the decoder is the mean of two draws
            out["pairs"].append(pairs + dec_var / 2)
            out["pairs_half"].append(pairs / 2 + dec_var / 2)
        return {k: np.array(v) for k, v in out.items()}

    def per_image(self, codes: torch.Tensor) -> dict[str, np.ndarray]:
        """Sums over the pixels of each image (independent noise per pixel), nats per image."""
        flat = codes.reshape(codes.shape[0], -1).numpy()
        return {k: v[flat].sum(1) for k, v in self.per_value().items()}


VLB_LEVELS, VLB_SHAPE = 32, (1, 2, 2)


def _codes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VLB_LEVELS, (n, *VLB_SHAPE), generator=torch.Generator().manual_seed(seed))


def test_full_loop_of_a_short_declared_schedule_matches_its_expectation() -> None:
    """T = 100, fixed_small, declared by the model: Σ_t E[L_t] + prior in closed form, the full loop within 4 SE."""
    abar = _linear_abar(100)
    schedule = DiscreteTime(torch.tensor(abar), "fixed_small", "test schedule")
    codes = _codes(256)
    r = nll(codes, Shrink(schedule), levels=VLB_LEVELS, estimator="vlb", vlb_full=True, device="cpu", save=False)
    info = r.solvers["vlb"]
    assert info.details["schedule"] == "test schedule" and info.details["steps"] == 100
    assert info.details["method"].startswith("full loop")
    assert info.evals_per_image == 99 + 1 + 2  # every step once, the unpaired last step again, the decoder twice
    expected = _bpd(BoundTerms(abar, "fixed_small", VLB_LEVELS).per_image(codes)["mean"], 4)
    e = r.estimates["vlb"]
    assert e.stderr_bpd is not None and e.stderr_bpd > 0
    assert abs(e.bpd - expected.mean()) <= 4 * e.stderr_bpd, (e.bpd, expected.mean(), e.stderr_bpd)
    wrong = _bpd(BoundTerms(abar, "fixed_large", VLB_LEVELS).per_image(codes)["mean"], 4).mean()
    assert abs(e.bpd - wrong) > 4 * e.stderr_bpd  # the variance kind the model declared is the one used


def test_two_step_chain_counts_its_prior_and_the_variance_of_its_one_unpaired_step() -> None:
    """T = 2 (ᾱ = 0.95, 0.6): decoder + L_1 + a large prior in closed form; L_1 has no partner to pair with.

    The reported variance must cover Var L_1 + Var L_0/2 summed over images, and the mean must include the prior.
    """
    abar = np.array([0.95, 0.6])
    schedule = DiscreteTime(torch.tensor(abar), "fixed_small", "two steps")  # Var L_1 ≈ 16 × Var L_0 / 2 here
    codes = _codes(1024, seed=3)
    r = nll(codes, Shrink(schedule), levels=VLB_LEVELS, estimator="vlb", vlb_full=True, device="cpu", save=False)
    terms = BoundTerms(abar, "fixed_small", VLB_LEVELS)
    expected = terms.per_image(codes)
    e = r.estimates["vlb"]
    assert e.stderr_bpd is not None and e.stderr_bpd > 0
    mean = _bpd(expected["mean"], 4).mean()
    assert abs(e.bpd - mean) <= 4 * e.stderr_bpd, (e.bpd, mean, e.stderr_bpd)
    priors = np.array([terms.prior(float(v)) for v in terms.values])[codes.reshape(len(codes), -1).numpy()].sum(1)
    assert _bpd(priors, 4).mean() > 6 * e.stderr_bpd  # leaving the prior out could not pass the line above
    reported = (r.arrays["se/vlb"].numpy() * 4 * LN2) ** 2  # nats² per image
    ratio = reported.sum() / expected["var"].sum()
    assert 0.7 < ratio < 1.4, ratio


@pytest.fixture(scope="module")
def default_schedule_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Shrink model without a schedule (the default T = 1000, fixed_large), full loop and stratified."""
    codes = _codes(48, seed=1)
    common = {"levels": VLB_LEVELS, "estimator": "vlb", "device": "cpu", "save": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ITD_HOME", str(tmp_path_factory.mktemp("vlb-home")))
        full = nll(codes, Shrink(), vlb_full=True, **common)
        strat = nll(codes, Shrink(), target_stderr=0.05, **common)
    terms = BoundTerms(np.asarray(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)),
                       "fixed_large", VLB_LEVELS).per_image(codes)  # fmt: skip
    return {"codes": codes, "full": full, "strat": strat, "terms": terms}


def test_stratified_bound_agrees_with_the_full_loop_at_a_fraction_of_its_cost(
    default_schedule_runs: dict[str, Any],
) -> None:
    full, strat, terms = (default_schedule_runs[k] for k in ("full", "strat", "terms"))
    for r in (full, strat):
        assert r.solvers["vlb"].details["schedule"].startswith("default")
        assert r.solvers["vlb"].details["steps"] == 1000
    assert full.solvers["vlb"].evals_per_image == 999 + 1 + 2
    assert strat.solvers["vlb"].details["method"].startswith("stratified")
    assert strat.solvers["vlb"].evals_per_image < 0.5 * full.solvers["vlb"].evals_per_image
    ef, es = full.estimates["vlb"], strat.estimates["vlb"]
    assert ef.stderr_bpd is not None and es.stderr_bpd is not None
    # the target bounds the whole bound's error, the decoder's share included
    assert es.stderr_bpd <= 0.05
    assert abs(ef.bpd - es.bpd) <= 3 * math.hypot(ef.stderr_bpd, es.stderr_bpd), (ef.bpd, es.bpd)
    expected = _bpd(terms["mean"], 4).mean()
    for e in (ef, es):
        assert abs(e.bpd - expected) <= 4 * e.stderr_bpd, (e.bpd, expected, e.stderr_bpd)


def test_stratified_rounds_meet_the_target_with_the_decoders_error_and_say_when_it_alone_misses() -> None:
    """T = 400 with ᾱ_0 = 0.999: the decoder's two draws carry much of the error, which more steps cannot lower."""
    abar = _linear_abar(400)
    schedule = DiscreteTime(torch.tensor(abar * 0.999 / abar[0]), "fixed_large", "noisy decoder")
    codes = _codes(48, seed=1)
    common = {"levels": VLB_LEVELS, "estimator": "vlb", "device": "cpu", "save": False}
    met = nll(codes, Shrink(schedule), target_stderr=0.1, **common)
    e = met.estimates["vlb"]
    assert e.stderr_bpd is not None and e.stderr_bpd <= 0.1
    assert met.solvers["vlb"].details["steps_per_image"] > 32  # a second round ran: the first one's total missed
    assert not [w for w in met.warnings if w.startswith("vlb:")]
    missed = nll(codes, Shrink(schedule), target_stderr=0.05, **common)
    (line,) = [w for w in missed.warnings if w.startswith("vlb:")]
    assert line.startswith("vlb: the decoder term") and "--target-stderr" in line
    assert missed.solvers["vlb"].details["steps_per_image"] == 32  # no rounds spent on what they cannot lower
    advised = float(line.rsplit("--target-stderr ", 1)[1].split()[0])
    followed = nll(codes, Shrink(schedule), target_stderr=advised, **common)  # the advice works when followed
    assert not [w for w in followed.warnings if w.startswith("vlb:")]
    assert (followed.estimates["vlb"].stderr_bpd or math.inf) <= advised


def test_full_loop_standard_error_covers_its_true_variance(default_schedule_runs: dict[str, Any]) -> None:
    """Steps draw independent noise, so Var(Σ_t L_t) = Σ_t Var L_t (+ Var L_0/2): the reported variance covers it."""
    full, terms = default_schedule_runs["full"], default_schedule_runs["terms"]
    reported = (full.arrays["se/vlb"].numpy() * 4 * LN2) ** 2  # nats² per image
    true, half = terms["var"].sum(), terms["pairs_half"].sum()
    assert half < 0.75 * true  # the test can tell the two apart
    assert reported.sum() >= 0.85 * true, (reported.sum() / true, half / true)


def test_bound_of_the_exact_denoiser_lies_above_the_entropy_and_closes_in_as_t_grows() -> None:
    """x uniform over a dataset of grid points (a law P): E VLB ≥ E[−log P] = H(P), and the gap shrinks with T."""
    levels, d = 5, 4
    support = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1], [2, 2, 2, 2], [1, 3, 0, 4]])
    counts = [256, 128, 64, 64]  # P = (1/2, 1/4, 1/8, 1/8) exactly
    codes = torch.cat([row.repeat(c, 1) for row, c in zip(support, counts, strict=True)]).reshape(-1, 1, 2, 2)
    p = torch.tensor(counts, dtype=F64) / sum(counts)
    entropy = _bpd(float(-(p * p.log()).sum()), d)
    points = support.to(F64) * 2 / (levels - 1) - 1
    values = {}
    for steps in (25, 1000):
        model = MixtureDenoiser(points, torch.zeros_like(points), p)
        model.discrete_time = DiscreteTime(torch.tensor(_linear_abar(steps)), "fixed_small", f"T = {steps}")
        r = nll(codes, model, levels=levels, estimator="vlb", vlb_full=True, device="cpu", save=False)
        values[steps] = r.estimates["vlb"]
    short, long = values[25], values[1000]
    assert short.stderr_bpd is not None and long.stderr_bpd is not None
    assert short.bpd - entropy > 4 * short.stderr_bpd  # a short chain's Gaussian steps cost visibly more
    assert long.bpd >= entropy - 4 * long.stderr_bpd  # a bound: never significantly below H(P)
    assert short.bpd - long.bpd > 3 * math.hypot(short.stderr_bpd, long.stderr_bpd)
    assert long.bpd - entropy < 0.03  # and close to it at T = 1000


# ---------------------------------------------------------------- 4. stand-ins of the real architectures


def _cosine_abar(steps: int) -> np.ndarray:
    """improved-diffusion's cosine schedule: β_t = min(1 − f(t+1)/f(t), 0.999), f(t) = cos²((t/T + s)/(1 + s)·π/2)."""
    f = np.cos((np.arange(steps + 1) / steps + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))


@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One itd home with fake CIFAR-10 and both random-weight stand-ins where `itd download` puts them."""
    home = tmp_path_factory.mktemp("three-likelihoods-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ITD_HOME", str(home))
        write_cifar(paths.cifar_dir(), 2)
        save_iddpm(paths.iddpm_checkpoint("iddpm"))
        save_ddpm(paths.ddpm_dir())
    return home


def _cli_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run(["nll", "cifar_test", *args, "--limit", "1", "--json"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("model", ["iddpm", "ddpm"])
def test_stand_in_variational_bound_runs_on_its_own_schedule(
    model: str, placed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITD_HOME", str(placed))
    result = _cli_json(["--model", model, "--estimator", "vlb", "--points", "8"], capsys)
    assert list(result["estimates"]) == ["vlb"]
    e = result["estimates"]["vlb"]
    assert math.isfinite(e["bpd"]) and e["bpd"] > 0 and e["stderr_bpd"] > 0
    info = result["solvers"]["vlb"]
    assert info["details"]["method"].startswith("stratified") and info["details"]["steps_per_image"] == 32
    assert 32 + 2 <= info["evals_per_image"] < 200
    from itdcli.models import load_model

    declared = load_model(model).discrete_time  # ITD_HOME is still the placed home
    if model == "iddpm":
        state = torch.load(paths.iddpm_checkpoint("iddpm"), map_location="cpu", weights_only=True)
        assert state["out.2.weight"].shape[0] == 6  # ε and the variance channels v
        assert info["details"]["steps"] == 4000
        assert info["details"]["schedule"] == "IDDPM cosine, T = 4000, learned_range"
        expected = _cosine_abar(4000)
    else:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(paths.ddpm_dir())
        assert scheduler.config.variance_type == "fixed_large"
        assert info["details"]["steps"] == 1000
        assert info["details"]["schedule"] == "diffusers scheduler, T = 1000, fixed_large"
        expected = scheduler.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(declared.alphas_cumprod.double().numpy(), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["iddpm", "ddpm"])
def test_stand_in_flow_ode_runs_end_to_end(
    model: str, placed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loose tolerances, two probes, a narrow range inside both trained ranges so that it stays quick on CPU."""
    monkeypatch.setenv("ITD_HOME", str(placed))
    args = ["--model", model, "--estimator", "ode", "--rtol", "1e-2", "--atol", "1e-2", "--probes", "2",
            "--logsnr-min", "0", "--logsnr-max", "2"]  # fmt: skip
    result = _cli_json(args, capsys)
    assert list(result["estimates"]) == ["ode"]
    e = result["estimates"]["ode"]
    assert math.isfinite(e["bpd"]) and math.isfinite(e["stderr_bpd"]) and e["stderr_bpd"] > 0
    info = result["solvers"]["ode"]
    assert info["evals_per_image"] > 0 and info["seconds"] > 0
    assert info["details"]["probes"] == 2 and info["details"]["dequantization_draws"] == 2
    assert info["details"]["logsnr_range"] == "[0.000, 2.000]"
    assert "rtol 0.01, atol 0.01" in info["details"]["solver"]


# ---------------------------------------------------------------- 5. refusals in one line


def test_vlb_on_float_data_is_refused_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = torch.randn(8, 1, 2, 2)
    with pytest.raises(ItdError, match="vlb estimator needs discrete data") as info:
        nll(data, "gaussian", estimator="vlb", device="cpu", save=False)
    assert "\n" not in str(info.value)
    path = tmp_path / "floats.npz"
    np.savez(path, x=data.numpy())
    code, out, err = run(["nll", str(path), "--model", "gaussian", "--estimator", "vlb"], capsys)
    assert code == 2 and out == ""
    assert "vlb estimator needs discrete data" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("how", ["detach", "no_grad", "numpy"])
def test_non_differentiable_model_is_refused_by_the_ode_naming_the_logsnr(how: str) -> None:
    def shrink(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        if how == "detach":
            return (0.5 * z).detach()
        if how == "numpy":
            return torch.from_numpy(0.5 * z.detach().numpy())
        with torch.no_grad():
            return 0.5 * z

    data = torch.randn(8, 1, 2, 2)
    with pytest.raises(ItdError) as info:
        nll(data, shrink, estimator="ode", logsnr_max=5.0, probes=2, device="cpu", save=False)
    message = str(info.value)
    assert "\n" not in message
    assert "not differentiable" in message and "at logSNR 5 of [" in message, message


def test_an_ode_that_runs_out_of_steps_is_one_line_naming_the_options_that_change_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--ode-max-steps 2 on the digits: exit 2, one line with the logSNR reached and the flags; more steps solve it."""
    base = ["nll", "digits_test", "--model", "digits", "--estimator", "ode", "--limit", "2", "--probes", "2",
            "--rtol", "1e-2", "--atol", "1e-2", "--logsnr-min", "0", "--logsnr-max", "2"]  # fmt: skip
    code, _, err = run([*base, "--ode-max-steps", "2", "--out", str(tmp_path / "few")], capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "did not converge (max_num_steps exceeded)" in line and "stopped at logSNR" in line
    assert "--ode-max-steps (now 2)" in line and "--rtol/--atol" in line
    code, out, err = run([*base, "--ode-max-steps", "200", "--json", "--out", str(tmp_path / "more")], capsys)
    assert code == 0, err
    assert math.isfinite(json.loads(out)["estimates"]["ode"]["bpd"])


class StageRecorder:
    """A progress callback that records its stages and every (stage, done, total) update."""

    def __init__(self) -> None:
        self.stages: list[tuple[str, str]] = []
        self.updates: list[tuple[int, int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.updates.append((len(self.stages), done, total))

    def stage(self, label: str, unit: str) -> None:
        self.stages.append((label, unit))


def test_the_solvers_show_progress_in_their_own_units_up_to_the_cost_they_report() -> None:
    """`--estimator all`: the points bar, then one stage per solver; each ends at done = total = its own count."""
    abar = _linear_abar(100)
    codes = _codes(24)
    progress = StageRecorder()
    model = Shrink(DiscreteTime(torch.tensor(abar), "fixed_small", "test schedule"))
    r = nll(
        codes, model, levels=VLB_LEVELS, estimator="all", vlb_full=True, points=8, device="cpu", save=False,
        progress=progress,
    )  # fmt: skip
    assert progress.stages == [("vlb", "evaluations"), ("ode", "images")]
    expected_totals = {1: 102 * len(codes), 2: 2 * len(codes)}  # every step, its unpaired last step, the decoder twice
    for stage in (0, 1, 2):
        seen = [(done, total) for s, done, total in progress.updates if s == stage]
        assert seen, f"stage {stage} showed no progress"
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen)), seen
        assert all(done <= total for done, total in seen), seen
        assert seen[-1][0] == seen[-1][1], seen[-1]
        if stage:  # the solvers know their whole cost (the full loop, the images) from their first update
            assert {total for _, total in seen} == {expected_totals[stage]}, (stage, seen[:3], seen[-1])
    assert r.solvers["vlb"].evals_per_image * len(codes) == expected_totals[1]
