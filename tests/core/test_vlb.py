"""The discrete-time variational bound against a numpy/scipy transcription, closed forms and Monte Carlo."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats

from itdcli.core.vlb import (
    DiscreteSchedule,
    VarianceKind,
    discretized_gaussian_nll,
    model_logvar,
    model_mean,
    normal_kl,
    posterior_mean,
    prior_bpd,
    q_sample,
    step_bpd,
    stratified_estimate,
    stratified_timesteps,
    uniform_proposal,
)
from itdcli.errors import ItdError

Arr = np.ndarray
F64 = torch.float64
LN2 = math.log(2)
T_SMALL = 50
SHAPE = (3, 4, 4)


# ---------------------------------------------------------------- independent numpy transcription


def _cosine_abar(steps: int) -> Arr:
    """ᾱ of the cosine schedule with β capped at 0.999, built here from f(t) = cos²((t/T + s)/(1 + s) π/2)."""
    s = 0.008
    f = np.cos((np.arange(steps + 1) / steps + s) / (1 + s) * np.pi / 2) ** 2
    beta = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - beta)


def _linear_abar(steps: int) -> Arr:
    """ᾱ of a linear β schedule from 1e-4 to 0.02 scaled to `steps` like improved-diffusion's."""
    scale = 1000 / steps
    return np.cumprod(1 - np.linspace(scale * 1e-4, scale * 0.02, steps))


class _Ref:
    """The bound written out per timestep from the precision form of the Gaussian posterior."""

    def __init__(self, abar: np.ndarray) -> None:
        self.abar = abar
        self.prev = np.concatenate([[1.0], abar[:-1]])
        self.alpha = abar / self.prev
        self.beta = 1 - self.alpha
        var = np.empty_like(abar)
        var[1:] = 1 / (1 / (1 - self.prev[1:]) + self.alpha[1:] / self.beta[1:])
        var[0] = var[1]
        self.var_small = var  # β̃ with its t = 0 entry clipped to β̃_1

    def mean(self, x0: Arr, xt: Arr, t: int) -> Arr:
        """μ̃ = β̃ (√ᾱ_{t−1} x0/(1 − ᾱ_{t−1}) + √α_t x_t/β_t); at t = 0 the posterior sits on x0."""
        if t == 0:
            return x0
        return self.var_small[t] * (
            np.sqrt(self.prev[t]) * x0 / (1 - self.prev[t]) + np.sqrt(self.alpha[t]) * xt / self.beta[t]
        )

    def x0_hat(self, xt: Arr, eps: Arr, t: int, clip: bool) -> Arr:
        x0 = (xt - np.sqrt(1 - self.abar[t]) * eps) / np.sqrt(self.abar[t])
        return np.clip(x0, -1, 1) if clip else x0

    def model_var(self, kind: str, v: Arr, t: int) -> Arr:
        large = self.beta[t] if t > 0 else self.var_small[1]
        if kind == "fixed_small":
            return np.full(v.shape, self.var_small[t])
        if kind == "fixed_large":
            return np.full(v.shape, large)
        frac = (v + 1) / 2
        return self.beta[t] ** frac * self.var_small[t] ** (1 - frac)

    def term(
        self, x0: Arr, xt: Arr, eps: Arr, v: Arr, t: int, kind: str, clip: bool, levels: int, tanh: bool = False
    ) -> float:
        mean_p = self.mean(self.x0_hat(xt, eps, t, clip), xt, t)
        var_p = self.model_var(kind, v, t)
        if t == 0:
            nats = -np.log(_np_tanh_bins(x0, mean_p, var_p) if tanh else _np_bins(x0, mean_p, var_p, levels))
        else:
            nats = _np_kl(self.mean(x0, xt, t), self.var_small[t], mean_p, var_p)
        return float(nats.mean() / LN2)


def _np_kl(m1: Arr, v1: Arr | float, m2: Arr, v2: Arr) -> Arr:
    """KL of two normals from their standard deviations."""
    s1, s2 = np.sqrt(v1), np.sqrt(v2)
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def _np_bins(x: Arr, mean: Arr | float, var: Arr | float, levels: int) -> Arr:
    """P(bin of x) under N(mean, var) by scipy, the end bins open, each side computed where it is not ~1."""
    h = 1 / (levels - 1)
    sd = np.sqrt(var)
    zl, zu = (x - h - mean) / sd, (x + h - mean) / sd
    inner = np.where(zl > 0, stats.norm.sf(zl) - stats.norm.sf(zu), stats.norm.cdf(zu) - stats.norm.cdf(zl))
    first, last = np.isclose(x, -1), np.isclose(x, 1)
    return np.where(first, stats.norm.cdf(zu), np.where(last, stats.norm.sf(zl), inner))


def _np_tanh_bins(x: Arr, mean: Arr, var: Arr) -> Arr:
    """improved-diffusion's 256-level bins with Φ ≈ ½(1 + tanh(√(2/π)(z + 0.044715 z³))) and a 1e-12 floor."""

    def phi(z: Arr) -> Arr:
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    sd = np.sqrt(var)
    up, down = phi((x - mean + 1 / 255) / sd), phi((x - mean - 1 / 255) / sd)
    p = np.where(x < -0.999, up, np.where(x > 0.999, 1 - down, up - down))
    return np.maximum(p, 1e-12)


# ---------------------------------------------------------------- a small random network and data


def _net(xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded 3×3 convolution of (x_t, t/T) to ε̂ (C channels) and v = tanh(·) ∈ (−1, 1) (C channels)."""
    g = torch.Generator().manual_seed(7)
    c = xt.shape[1]
    weight = 0.4 * torch.randn(2 * c, c + 1, 3, 3, generator=g, dtype=F64)
    bias = 0.3 * torch.randn(2 * c, generator=g, dtype=F64)
    tmap = (t.to(F64) / T_SMALL).reshape(-1, 1, 1, 1).expand(-1, 1, *xt.shape[2:])
    out = F.conv2d(torch.cat([xt.to(F64), tmap], 1), weight, bias, padding=1)
    return out[:, :c], torch.tanh(out[:, c:])


def _grid_images(n: int, levels: int, seed: int) -> Arr:
    """Images on the L-level grid of [−1, 1], with some pixels forced to both end levels."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, levels, size=(n, *SHAPE))
    k[:, 0, 0, 0], k[:, 0, 0, 1] = 0, levels - 1
    return k * 2 / (levels - 1) - 1


def _every_step(abar: Arr, levels: int, seed: int = 0) -> tuple[Arr, torch.Tensor, Arr, Arr, Arr]:
    """One image per timestep t = 0..T−1: x0, t, x_t = √ᾱ x0 + √(1 − ᾱ) ε, and the network's ε̂ and v."""
    x0 = _grid_images(len(abar), levels, seed)
    noise = np.random.default_rng(seed + 1).standard_normal(x0.shape)
    a = abar.reshape(-1, 1, 1, 1)
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    t = torch.arange(len(abar))
    eps, v = _net(torch.from_numpy(xt), t)
    return x0, t, xt, eps.numpy(), v.numpy()


SCHEDULES = {"cosine": _cosine_abar(T_SMALL), "linear": _linear_abar(T_SMALL)}


# ---------------------------------------------------------------- 1. against the transcription


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_schedule_quantities_match_the_transcription(schedule_name: str) -> None:
    abar = SCHEDULES[schedule_name]
    ref, sched = _Ref(abar), DiscreteSchedule(torch.from_numpy(abar))
    np.testing.assert_allclose(sched.betas.numpy(), ref.beta, rtol=1e-12)
    np.testing.assert_allclose(sched.posterior_logvar_clipped.exp().numpy(), ref.var_small, rtol=1e-12)
    np.testing.assert_allclose(sched.logsnr.numpy(), np.log(abar / (1 - abar)), rtol=1e-12, atol=1e-12)
    assert sched.steps == T_SMALL
    assert sched.posterior_variance[0] == 0


@pytest.mark.parametrize("clip", [True, False])
def test_posterior_and_model_means_match_the_transcription(clip: bool) -> None:
    """The bound sees only μ̃ − μ_θ, where c2 cancels; the means themselves are checked here."""
    abar = SCHEDULES["cosine"]
    ref, sched = _Ref(abar), DiscreteSchedule(torch.from_numpy(abar))
    x0, t, xt, eps, _ = _every_step(abar, 256)
    noise = np.random.default_rng(1).standard_normal(x0.shape)
    x0_t, xt_t = torch.from_numpy(x0), torch.from_numpy(xt)
    np.testing.assert_allclose(q_sample(sched, x0_t, t, torch.from_numpy(noise)).numpy(), xt, rtol=1e-12, atol=1e-14)
    got_q = posterior_mean(sched, x0_t, xt_t, t).numpy()
    got_p = model_mean(sched, xt_t, t, torch.from_numpy(eps), clip).numpy()
    for s in range(T_SMALL):
        np.testing.assert_allclose(got_q[s], ref.mean(x0[s], xt[s], s), rtol=1e-10, atol=1e-12)
        want_p = ref.mean(ref.x0_hat(xt[s], eps[s], s, clip), xt[s], s)
        np.testing.assert_allclose(got_p[s], want_p, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("levels", [256, 16])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("kind", ["learned_range", "fixed_large", "fixed_small"])
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_step_bpd_matches_the_transcription_at_every_step(
    schedule_name: str, kind: VarianceKind, clip: bool, levels: int
) -> None:
    abar = SCHEDULES[schedule_name]
    ref, sched = _Ref(abar), DiscreteSchedule(torch.from_numpy(abar))
    x0, t, xt, eps, v = _every_step(abar, levels)
    if clip:  # the clamp is active at some noisy step, so dropping it would show
        assert max(np.abs(ref.x0_hat(xt[s], eps[s], s, False)).max() for s in range(1, T_SMALL)) > 1.5
    x0_t, xt_t, eps_t, v_t = (torch.from_numpy(z) for z in (x0, xt, eps, v))
    logvar = model_logvar(sched, t, kind, v_t if kind == "learned_range" else None, xt_t)
    got = step_bpd(sched, x0_t, xt_t, t, eps_t, logvar, levels, clip=clip).numpy()
    want = [ref.term(x0[s], xt[s], eps[s], v[s], s, kind, clip, levels) for s in range(T_SMALL)]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_step_bpd_takes_float32_inputs_and_returns_float64() -> None:
    abar = SCHEDULES["cosine"]
    ref, sched = _Ref(abar), DiscreteSchedule(torch.from_numpy(abar))
    x0, t, xt, eps, v = _every_step(abar, 256)
    x0, xt, eps, v = (z.astype(np.float32).astype(np.float64) for z in (x0, xt, eps, v))  # what float32 keeps
    x0_32, xt_32, eps_32, v_32 = (torch.from_numpy(z).float() for z in (x0, xt, eps, v))
    logvar = model_logvar(sched, t, "learned_range", v_32, xt_32)
    got = step_bpd(sched, x0_32, xt_32, t, eps_32, logvar, 256)
    assert got.dtype == F64
    want = [ref.term(x0[s], xt[s], eps[s], v[s], s, "learned_range", True, 256) for s in range(T_SMALL)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["learned_range", "fixed_small"])
def test_tanh_cdf_reproduces_the_original_decoder(kind: VarianceKind) -> None:
    abar = SCHEDULES["linear"]
    ref, sched = _Ref(abar), DiscreteSchedule(torch.from_numpy(abar))
    x0, t, xt, eps, v = _every_step(abar, 256, seed=3)
    x0_t, xt_t, eps_t, v_t = (torch.from_numpy(z) for z in (x0, xt, eps, v))
    logvar = model_logvar(sched, t, kind, v_t if kind == "learned_range" else None, xt_t)
    got = step_bpd(sched, x0_t, xt_t, t, eps_t, logvar, 256, approx_cdf=True)[0]
    want = ref.term(x0[0], xt[0], eps[0], v[0], 0, kind, True, 256, tanh=True)
    assert float(got) == pytest.approx(want, rel=1e-10)
    exact = step_bpd(sched, x0_t, xt_t, t, eps_t, logvar, 256)[0]
    assert abs(float(exact) - want) > 1e-6  # the two CDFs really differ


def test_tanh_cdf_elementwise_with_its_floor() -> None:
    rng = np.random.default_rng(5)
    x = _grid_images(4, 256, 5)
    mean = x + rng.normal(0, 0.05, x.shape)
    mean[0, 0, 0, 2] = x[0, 0, 0, 2] + 3.0  # a bin so far out that the floor applies
    var = np.exp(rng.uniform(np.log(1e-5), np.log(0.1), x.shape))
    x_t, mean_t, logvar_t = (torch.from_numpy(z) for z in (x, mean, np.log(var)))
    got = discretized_gaussian_nll(x_t, mean_t, logvar_t, 256, approx_cdf=True)
    # compared as probabilities: a narrow bin in the tail is a difference of two CDFs near 1 in either code
    np.testing.assert_allclose(np.exp(-got.numpy()), _np_tanh_bins(x, mean, var), rtol=1e-10, atol=1e-14)
    assert float(got[0, 0, 0, 2]) == pytest.approx(-math.log(1e-12))


# ---------------------------------------------------------------- 2. Gaussian data, closed forms


def _gaussian_case(t_step: int, n: int, seed: int) -> tuple[Arr, Arr, Arr, Arr, Arr, float]:
    """Data N(m, s²): x0 fixed, n draws of x_t, the exact posterior-mean ε̂; also the expected KL in bits/dim."""
    abar = SCHEDULES["cosine"]
    a = abar[t_step]
    m, s = 0.1, 0.3
    rng = np.random.default_rng(seed)
    x0 = rng.normal(m, s, SHAPE)
    noise = rng.standard_normal((n, *SHAPE))
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    gain = np.sqrt(a) * s**2 / (a * s**2 + 1 - a)  # E[x0 | x_t] = m + gain (x_t − √ᾱ m)
    x0_post = m + gain * (xt - np.sqrt(a) * m)
    eps_hat = (xt - np.sqrt(a) * x0_post) / np.sqrt(1 - a)
    prev = abar[t_step - 1]
    beta = 1 - a / prev
    c1 = np.sqrt(prev) * beta / (1 - a)
    var_post = beta * (1 - prev) / (1 - a)
    sq = c1**2 * ((1 - gain * np.sqrt(a)) ** 2 * (x0 - m) ** 2 + gain**2 * (1 - a))
    expected = float((sq / (2 * var_post)).mean() / LN2)
    return abar, x0, xt, eps_hat, noise, expected


@pytest.mark.parametrize("t_step", [1, 5, 25, 49])
def test_expected_kl_of_the_gaussian_posterior_denoiser_is_closed_form(t_step: int) -> None:
    n = 4000
    abar, x0, xt, eps_hat, _, expected = _gaussian_case(t_step, n, seed=t_step)
    sched = DiscreteSchedule(torch.from_numpy(abar))
    t = torch.full((n,), t_step)
    xt_t = torch.from_numpy(xt)
    x0_t = torch.from_numpy(np.broadcast_to(x0, xt.shape).copy())
    logvar = model_logvar(sched, t, "fixed_small", None, xt_t)
    terms = step_bpd(sched, x0_t, xt_t, t, torch.from_numpy(eps_hat), logvar, 256, clip=False).numpy()
    se = terms.std(ddof=1) / math.sqrt(n)
    assert abs(terms.mean() - expected) < 4 * se
    assert se < 0.05 * expected  # the test resolves the value, not just its order


@pytest.mark.parametrize("t_step", [1, 7, 30, 49])
def test_kl_is_exact_when_the_model_mean_is_the_posterior_mean(t_step: int) -> None:
    abar, x0, xt, _, noise, _ = _gaussian_case(t_step, 8, seed=100 + t_step)
    sched, ref = DiscreteSchedule(torch.from_numpy(abar)), _Ref(abar)
    t = torch.full((8,), t_step)
    x0_t = torch.from_numpy(np.broadcast_to(x0, xt.shape).copy())
    xt_t, eps = torch.from_numpy(xt), torch.from_numpy(noise)

    def bpd(kind: VarianceKind, v: torch.Tensor | None = None) -> Arr:
        logvar = model_logvar(sched, t, kind, v, xt_t)
        return step_bpd(sched, x0_t, xt_t, t, eps, logvar, 256, clip=False).numpy()

    ratio = ref.var_small[t_step] / ref.beta[t_step]
    large = 0.5 * (ratio - 1 - math.log(ratio)) / LN2
    np.testing.assert_allclose(bpd("fixed_small"), 0.0, atol=1e-11)
    np.testing.assert_allclose(bpd("fixed_large"), large, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bpd("learned_range", -torch.ones_like(xt_t)), 0.0, atol=1e-11)
    np.testing.assert_allclose(bpd("learned_range", torch.ones_like(xt_t)), large, rtol=1e-9, atol=1e-12)


def test_normal_kl_against_the_standard_deviation_form() -> None:
    rng = np.random.default_rng(11)
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    v1, v2 = np.exp(rng.normal(size=20)), np.exp(rng.normal(size=20))
    got = normal_kl(*(torch.from_numpy(z) for z in (m1, np.log(v1), m2, np.log(v2))))
    np.testing.assert_allclose(got.numpy(), _np_kl(m1, v1, m2, v2), rtol=1e-12)


# ---------------------------------------------------------------- 3. the discretized decoder


@pytest.mark.parametrize("levels", [2, 5, 256])
@pytest.mark.parametrize("mean", [-3.0, -1.0, -0.37, 0.0, 0.999, 2.5])
@pytest.mark.parametrize("var", [1e-8, 1e-4, 0.05, 1.0, 100.0])
def test_decoder_probabilities_sum_to_one_and_match_scipy(levels: int, mean: float, var: float) -> None:
    grid = np.linspace(-1, 1, levels)
    x = torch.from_numpy(grid)
    nll = discretized_gaussian_nll(x, torch.full_like(x, mean), torch.full_like(x, math.log(var)), levels)
    p = np.exp(-nll.numpy())
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    want = _np_bins(grid, mean, var, levels)
    ok = want > 1e-250
    np.testing.assert_allclose(p[ok], want[ok], rtol=1e-9, atol=1e-15)


def test_decoder_end_bins_extend_to_infinity() -> None:
    levels, var = 256, 0.01
    x = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=F64)
    mean = torch.tensor([-5.0, 5.0, -0.9, 0.8], dtype=F64)
    p = np.exp(-discretized_gaussian_nll(x, mean, torch.full_like(x, math.log(var)), levels).numpy())
    h, sd = 1 / 255, math.sqrt(var)
    assert p[0] == pytest.approx(1.0, abs=1e-12) and p[1] == pytest.approx(1.0, abs=1e-12)
    assert p[2] == pytest.approx(stats.norm.cdf((-1 + h + 0.9) / sd), rel=1e-12)
    assert p[3] == pytest.approx(stats.norm.sf((1 - h - 0.8) / sd), rel=1e-12)


def test_decoder_is_finite_far_in_the_tails() -> None:
    """Bins hundreds of standard deviations out on both sides, where Φ differences underflow."""
    x = torch.tensor([0.5, -0.5, 0.25], dtype=F64)
    mean = torch.tensor([0.0, 0.0, 0.3], dtype=F64)
    logvar = torch.full_like(x, math.log(1e-6))
    nll = discretized_gaussian_nll(x, mean, logvar, 256).numpy()
    sd = 1e-3
    zl, zu = (x.numpy() - 1 / 255 - mean.numpy()) / sd, (x.numpy() + 1 / 255 - mean.numpy()) / sd
    with np.errstate(divide="ignore"):  # np.where evaluates the unused side too
        upper = special.log_ndtr(-zl) + np.log1p(-np.exp(special.log_ndtr(-zu) - special.log_ndtr(-zl)))
        lower = special.log_ndtr(zu) + np.log1p(-np.exp(special.log_ndtr(zl) - special.log_ndtr(zu)))
    want = -np.where(zl > 0, upper, lower)
    assert np.isfinite(nll).all() and (nll > 1e3).all()
    np.testing.assert_allclose(nll, want, rtol=1e-12)


def test_decoder_rejects_fewer_than_two_levels() -> None:
    x = torch.zeros(2, dtype=F64)
    with pytest.raises(ItdError):
        discretized_gaussian_nll(x, x, x, 1)


# ---------------------------------------------------------------- 4. the prior term


@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
def test_prior_term_is_the_closed_form_kl(schedule_name: str) -> None:
    abar = SCHEDULES[schedule_name]
    a = abar[-1]
    x0 = _grid_images(3, 256, 9)
    per_dim = 0.5 * (a * x0**2 + (1 - a) - 1 - np.log(1 - a))
    want = per_dim.reshape(3, -1).mean(1) / LN2
    sched = DiscreteSchedule(torch.from_numpy(abar))
    # both sides cancel: the KL per pixel is ~ᾱ²/4 for a small ᾱ_{T−1}
    np.testing.assert_allclose(prior_bpd(sched, torch.from_numpy(x0)).numpy(), want, rtol=1e-9, atol=1e-15)
    got32 = prior_bpd(sched, torch.from_numpy(x0.astype(np.float32)))
    assert got32.dtype == F64
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-7)


def test_prior_term_of_a_short_schedule_is_not_negligible() -> None:
    """With ᾱ_{T−1} = 0.5 the prior KL is ½(0.5 x² − 0.5 + log 2) per pixel, by hand."""
    sched = DiscreteSchedule(torch.tensor([0.9, 0.7, 0.5], dtype=F64))
    x0 = torch.tensor([[[[1.0, -1.0], [0.0, 0.5]]]], dtype=F64)
    per_dim = [0.5 * (0.5 * v**2 - 0.5 + math.log(2)) for v in (1.0, -1.0, 0.0, 0.5)]
    assert float(prior_bpd(sched, x0)[0]) == pytest.approx(sum(per_dim) / 4 / LN2, rel=1e-12)


def test_schedule_rejects_invalid_alphas() -> None:
    for bad in ([0.9], [0.9, 0.95], [1.0, 0.5], [0.5, 0.0], [[0.9, 0.5]]):
        with pytest.raises(ItdError):
            DiscreteSchedule(torch.tensor(bad, dtype=F64))


# ---------------------------------------------------------------- 5. the stratified timestep sampler


def _exact_moments(q: Arr, terms: Arr, count: int) -> tuple[float, float]:
    """Mean and variance of the strata-of-two estimator from the overlap of each stratum with each t's CDF slice."""
    strata = count // 2
    hi = np.cumsum(q) / q.sum()
    lo = np.concatenate([[0.0], hi[:-1]])
    s_lo = np.arange(strata)[:, None] / strata
    overlap = np.clip(np.minimum(hi, s_lo + 1 / strata) - np.maximum(lo, s_lo), 0, None) * strata
    y = terms / (q / q.sum())
    mu = overlap @ y
    var = overlap @ y**2 - mu**2
    return float(mu.mean()), float(var.sum() / (2 * strata**2))


def _terms(spike: bool) -> Arr:
    """T = 4000 per-step terms: a decaying trend plus noise of both signs; optionally a large first term."""
    rng = np.random.default_rng(2024)
    t = np.arange(4000)
    terms = 2e-3 * np.exp(-t / 700) + rng.normal(0, 1e-3, t.size)
    if spike:
        terms[0], terms[1:4] = 4.0, 0.3
    return terms


def _estimates(q: Arr, terms: Arr, count: int, seeds: int) -> tuple[np.ndarray, np.ndarray]:
    est, se = np.empty(seeds), np.empty(seeds)
    for seed in range(seeds):
        draw = stratified_timesteps(torch.from_numpy(q), count, 1, torch.Generator().manual_seed(seed))
        e, s = stratified_estimate(draw, torch.from_numpy(terms)[draw.indices])
        est[seed], se[seed] = float(e[0]), float(s[0])
    return est, se


@pytest.mark.parametrize("proposal", ["uniform", "tilted"])
def test_stratified_estimate_is_unbiased_with_honest_errors(proposal: str) -> None:
    terms, count, seeds = _terms(spike=False), 64, 400
    q = np.ones(4000) / 4000 if proposal == "uniform" else np.exp(-np.arange(4000) / 2000)
    mean, var = _exact_moments(q, terms, count)
    assert mean == pytest.approx(terms.sum(), rel=1e-9)  # the overlap algebra itself
    est, se = _estimates(q, terms, count, seeds)
    assert abs(est.mean() - terms.sum()) < 4 * math.sqrt(var / seeds)
    assert 0.8 <= est.std(ddof=1) / se.mean() <= 1.25
    assert 0.8 <= (se**2).mean() / var <= 1.25
    assert np.mean(np.abs(est - terms.sum()) > 2 * se) <= 0.1


def test_importance_proposal_shrinks_the_error_and_stays_unbiased() -> None:
    terms, count, seeds = _terms(spike=True), 64, 300
    _, se_u = _estimates(np.ones(4000), terms, count, seeds)
    est_i, se_i = _estimates(np.abs(terms), terms, count, seeds)
    _, var_i = _exact_moments(np.abs(terms), terms, count)
    _, var_u = _exact_moments(np.ones(4000), terms, count)
    assert var_i < 0.01 * var_u  # exact: the spike at t = 0 no longer dominates
    assert np.sqrt((se_i**2).mean()) < 0.1 * np.sqrt((se_u**2).mean())
    assert abs(est_i.mean() - terms.sum()) < 4 * math.sqrt(var_i / seeds)
    assert 0.8 <= est_i.std(ddof=1) / se_i.mean() <= 1.25


def test_proposal_proportional_to_positive_terms_is_exact() -> None:
    terms = np.random.default_rng(4).uniform(0.1, 2.0, 300)
    draw = stratified_timesteps(torch.from_numpy(terms), 10, 5, torch.Generator().manual_seed(0))
    est, se = stratified_estimate(draw, torch.from_numpy(terms)[draw.indices])
    np.testing.assert_allclose(est.numpy(), terms.sum(), rtol=1e-12)
    np.testing.assert_allclose(se.numpy(), 0.0, atol=1e-10)


def test_draws_fall_two_to_a_stratum_with_inverse_probability_weights() -> None:
    steps, count = 64, 8
    draw = stratified_timesteps(uniform_proposal(steps), count, 500, torch.Generator().manual_seed(1))
    stratum = np.arange(count) // 2
    idx = draw.indices.numpy()
    assert draw.indices.shape == (500, count) and draw.indices.dtype == torch.long
    assert ((idx >= 16 * stratum) & (idx < 16 * (stratum + 1))).all()
    assert len(np.unique(idx[:, 0])) == 16  # every step of the first stratum is reached
    assert not np.array_equal(idx[0], idx[1])  # images draw independently
    np.testing.assert_allclose(draw.weights.numpy(), steps / count, rtol=1e-12)
    q = np.arange(1.0, 6.0)
    freq = np.bincount(
        stratified_timesteps(torch.from_numpy(q), 2, 40000, torch.Generator().manual_seed(2)).indices.flatten(), None, 5
    )
    p = q / q.sum()
    assert np.all(np.abs(freq / 80000 - p) < 4 * np.sqrt(p * (1 - p) / 80000))


def test_sampler_rejects_invalid_arguments() -> None:
    w = uniform_proposal(10)
    for count in (0, 1, 3):
        with pytest.raises(ItdError):
            stratified_timesteps(w, count, 1)
    for bad in (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, -1.0]), torch.tensor([1.0, math.inf])):
        with pytest.raises(ItdError):
            stratified_timesteps(bad, 2, 1)
    with pytest.raises(ItdError):
        model_logvar(DiscreteSchedule(torch.tensor([0.9, 0.5], dtype=F64)), torch.tensor([0]), "fixed_small", w, w)
