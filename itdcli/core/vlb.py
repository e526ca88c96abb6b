"""Discrete-time variational bound of improved-diffusion as pure tensor functions (docs/math.md, 'Variational bound').

The bound of Nichol & Dhariwal (2021, eqs. 4–7) in bits per dimension: a decoder term at t = 0, a KL term per
step t > 0 and a prior term at t = T − 1, with timesteps indexed 0..T−1 as in improved-diffusion. Everything is
computed in float64 whatever the inputs' dtype; the model is not called here (ε̂ and v arrive as tensors).

Departure from the reference code: the discretized Gaussian decoder uses the exact normal CDF (through log Φ, so
the tails do not underflow) instead of the tanh approximation; `approx_cdf=True` restores the approximation and
its 1e-12 probability floor to reproduce the original numbers. The decoder also takes any number of levels L.

The timestep sampler puts two independent draws in each equal-probability stratum of the proposal's CDF, which
makes its per-image variance estimate unbiased (Cochran, *Sampling Techniques*, 1977, §5.5; docs/math.md,
'Strata of two'). Each stratum gives that estimate one degree of freedom, so it is unreliable when a rare, large
term carries most of the variance: under a uniform proposal the decoder term at t = 0 is such a term (the error
bars came out 5× too small in a test), and a proposal weighted towards it, e.g. ∝ √E[L_t²] (Nichol & Dhariwal
2021, eq. 18), removes the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from itdcli.errors import ItdError

F64 = torch.float64
LN2 = math.log(2.0)
VarianceKind = Literal["learned_range", "fixed_large", "fixed_small"]
VARIANCE_KINDS: tuple[VarianceKind, ...] = ("learned_range", "fixed_large", "fixed_small")


@dataclass(frozen=True)
class DiscreteSchedule:
    """ᾱ_t for t = 0..T−1, strictly decreasing in (0, 1), and what derives from it (Nichol & Dhariwal 2021, §2)."""

    alphas_cumprod: Tensor

    def __post_init__(self) -> None:
        """Store ᾱ as float64 and reject schedules that are too short, out of (0, 1) or not decreasing."""
        a = torch.as_tensor(self.alphas_cumprod).detach().to(F64)
        if a.ndim != 1 or a.numel() < 2:
            raise ItdError(f"a discrete schedule needs ᾱ of shape (T,) with T ≥ 2, got shape {tuple(a.shape)}")
        if not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] < a[:-1]).all()):
            raise ItdError("a discrete schedule needs ᾱ_t strictly decreasing inside (0, 1)")
        object.__setattr__(self, "alphas_cumprod", a)

    @classmethod
    def from_betas(cls, betas: Tensor) -> DiscreteSchedule:
        """ᾱ_t = Π_{s≤t} (1 − β_s) (Nichol & Dhariwal 2021, eq. 8)."""
        return cls(torch.cumprod(1 - torch.as_tensor(betas).to(F64), 0))

    @property
    def steps(self) -> int:
        """T, the number of noisy steps."""
        return int(self.alphas_cumprod.numel())

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """ᾱ_{t−1}, with ᾱ_{−1} = 1."""
        return torch.cat([torch.ones(1, dtype=F64), self.alphas_cumprod[:-1]])

    @property
    def betas(self) -> Tensor:
        """β_t = 1 − ᾱ_t/ᾱ_{t−1}."""
        return 1 - self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def posterior_variance(self) -> Tensor:
        """β̃_t = β_t (1 − ᾱ_{t−1})/(1 − ᾱ_t), zero at t = 0 (Nichol & Dhariwal 2021, eq. 12)."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @property
    def posterior_logvar_clipped(self) -> Tensor:
        """log β̃_t with the t = 0 entry (log 0) replaced by log β̃_1, as improved-diffusion does."""
        var = self.posterior_variance
        return torch.cat([var[1:2], var[1:]]).log()

    @property
    def posterior_mean_coefs(self) -> tuple[Tensor, Tensor]:
        """(c1, c2) of μ̃_t = c1 x0 + c2 x_t (Nichol & Dhariwal 2021, eq. 11)."""
        a, a_prev, beta = self.alphas_cumprod, self.alphas_cumprod_prev, self.betas
        c1 = beta * a_prev.sqrt() / (1 - a)
        c2 = (1 - a_prev) * (1 - beta).sqrt() / (1 - a)
        return c1, c2

    @property
    def logsnr(self) -> Tensor:
        """γ_t = log ᾱ_t/(1 − ᾱ_t)."""
        return self.alphas_cumprod.log() - torch.log1p(-self.alphas_cumprod)


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] per image, shaped (B, 1, …, 1) to broadcast over `like`, in float64 on like's device."""
    picked = values.to(like.device)[t.to(like.device).long()]
    return picked.reshape(-1, *([1] * (like.ndim - 1)))


def _bits_per_dim(elementwise: Tensor) -> Tensor:
    """Mean over every non-batch dimension, nats to bits."""
    return elementwise.reshape(elementwise.shape[0], -1).mean(1) / LN2


def q_sample(schedule: DiscreteSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε (Nichol & Dhariwal 2021, eq. 9)."""
    a = _at(schedule.alphas_cumprod, t, x0)
    return a.sqrt() * x0.to(F64) + (1 - a).sqrt() * noise.to(F64)


def predict_x0(schedule: DiscreteSchedule, x_t: Tensor, t: Tensor, eps_hat: Tensor, clip: bool = True) -> Tensor:
    """x̂0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε̂, clamped to [−1, 1] when `clip` (Ho et al. 2020, eq. 4 inverted)."""
    a = _at(schedule.alphas_cumprod, t, x_t)
    x0 = (1 / a).sqrt() * x_t.to(F64) - (1 / a - 1).sqrt() * eps_hat.to(F64)
    return x0.clamp(-1, 1) if clip else x0


def posterior_mean(schedule: DiscreteSchedule, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """μ̃_t(x_t, x0) = c1_t x0 + c2_t x_t of q(x_{t−1} | x_t, x0) (Nichol & Dhariwal 2021, eq. 11)."""
    c1, c2 = schedule.posterior_mean_coefs
    return _at(c1, t, x_t) * x0.to(F64) + _at(c2, t, x_t) * x_t.to(F64)


def model_mean(schedule: DiscreteSchedule, x_t: Tensor, t: Tensor, eps_hat: Tensor, clip: bool = True) -> Tensor:
    """μ_θ = μ̃_t(x_t, x̂0(x_t, ε̂)), the mean through the predicted x0 (Nichol & Dhariwal 2021, eq. 11)."""
    return posterior_mean(schedule, predict_x0(schedule, x_t, t, eps_hat, clip), x_t, t)


def model_logvar(schedule: DiscreteSchedule, t: Tensor, kind: VarianceKind, v: Tensor | None, like: Tensor) -> Tensor:
    """log Σ_θ, like.shape: learned_range (Nichol & Dhariwal 2021, eq. 15), fixed β_t or β̃_t (Ho et al. 2020, §3.2)."""
    if kind not in VARIANCE_KINDS:
        raise ItdError(f"unknown variance kind {kind!r}; choose one of {', '.join(VARIANCE_KINDS)}")
    if (kind == "learned_range") != (v is not None):
        raise ItdError("pass v (the model's variance channels) for learned_range, and only for learned_range")
    small = _at(schedule.posterior_logvar_clipped, t, like)
    if kind == "fixed_small":
        return small.expand(like.shape)
    log_beta = schedule.betas.log()
    if kind == "fixed_large":
        large = torch.cat([schedule.posterior_variance[1:2].log(), log_beta[1:]])
        return _at(large, t, like).expand(like.shape)
    assert v is not None
    frac = (v.to(F64) + 1) / 2
    return (frac * _at(log_beta, t, like) + (1 - frac) * small).expand(like.shape)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(μ1, e^{ℓ1}) ‖ N(μ2, e^{ℓ2})) elementwise in nats: ½(ℓ2 − ℓ1 + e^{ℓ1−ℓ2} + (μ1 − μ2)² e^{−ℓ2} − 1)."""
    m1, l1, m2, l2 = (torch.as_tensor(z).to(F64) for z in (mean1, logvar1, mean2, logvar2))
    kl: Tensor = 0.5 * (l2 - l1 + torch.exp(l1 - l2) + (m1 - m2) ** 2 * torch.exp(-l2) - 1)
    return kl


def _log_interval(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi, mirrored into the lower tail so that neither CDF rounds to 1."""
    flip = (lo + hi) > 0
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_b: Tensor = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def _approx_cdf(z: Tensor) -> Tensor:
    """improved-diffusion's tanh approximation Φ(z) ≈ ½(1 + tanh(√(2/π)(z + 0.044715 z³)))."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def _approx_log_probs(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log Φ(hi), log(1 − Φ(lo)), log(Φ(hi) − Φ(lo))) with the tanh CDF and improved-diffusion's 1e-12 floor."""
    cdf_lo, cdf_hi = _approx_cdf(lo), _approx_cdf(hi)
    floor = 1e-12
    return cdf_hi.clamp_min(floor).log(), (1 - cdf_lo).clamp_min(floor).log(), (cdf_hi - cdf_lo).clamp_min(floor).log()


def discretized_gaussian_nll(x0: Tensor, mean: Tensor, logvar: Tensor, levels: int, approx_cdf: bool = False) -> Tensor:
    """−log ∫_bin N(x; μ, e^ℓ) dx on L levels of [−1, 1], end bins open (Ho et al. 2020, eq. 13), elementwise nats."""
    if levels < 2:
        raise ItdError(f"the discretized decoder needs at least 2 levels, got {levels}")
    x, mu, lv = x0.to(F64), mean.to(F64), logvar.to(F64)
    half = 1.0 / (levels - 1)
    inv_std = torch.exp(-0.5 * lv)
    lo, hi = (x - mu - half) * inv_std, (x - mu + half) * inv_std
    if approx_cdf:
        log_below, log_above, log_bin = _approx_log_probs(lo, hi)
    else:
        log_below, log_above, log_bin = torch.special.log_ndtr(hi), torch.special.log_ndtr(-lo), _log_interval(lo, hi)
    logp = torch.where(x < -1 + half, log_below, torch.where(x > 1 - half, log_above, log_bin))
    return -logp


def step_bpd(
    schedule: DiscreteSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    eps_hat: Tensor,
    logvar: Tensor,
    levels: int,
    clip: bool = True,
    approx_cdf: bool = False,
) -> Tensor:
    """L_t per image in bits/dim: decoder NLL at t = 0, KL(q ‖ p_θ) elsewhere (Nichol & Dhariwal 2021, eqs. 5–6)."""
    mean = model_mean(schedule, x_t, t, eps_hat, clip)
    true_mean = posterior_mean(schedule, x0, x_t, t)
    true_logvar = _at(schedule.posterior_logvar_clipped, t, true_mean)
    kl = normal_kl(true_mean, true_logvar, mean, logvar)
    nll = discretized_gaussian_nll(x0, mean, logvar, levels, approx_cdf)
    first = (t.to(true_mean.device) == 0).reshape(-1, *([1] * (true_mean.ndim - 1)))
    return _bits_per_dim(torch.where(first, nll, kl))


def prior_bpd(schedule: DiscreteSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(N(√ᾱ_{T−1} x0, 1 − ᾱ_{T−1}) ‖ N(0, I)) per image in bits/dim (Nichol & Dhariwal 2021, eq. 7)."""
    a = schedule.alphas_cumprod[-1]
    x = x0.to(F64)
    return _bits_per_dim(normal_kl(a.sqrt() * x, torch.log1p(-a), torch.zeros_like(x), torch.zeros_like(x)))


def uniform_proposal(steps: int) -> Tensor:
    """q(t) = 1/T on t = 0..T−1."""
    if steps < 1:
        raise ItdError(f"a proposal needs at least one timestep, got {steps}")
    return torch.full((steps,), 1.0 / steps, dtype=F64)


@dataclass(frozen=True)
class TimestepDraw:
    """K timesteps per image, (B, K) long, columns 2i and 2i + 1 in stratum i; weights 1/(K q(t)) in float64."""

    indices: Tensor
    weights: Tensor


def _normalised(proposal: Tensor) -> Tensor:
    """The proposal divided by its sum, after checking that every weight is positive and finite."""
    w = torch.as_tensor(proposal).to(F64)
    if w.ndim != 1 or w.numel() < 1 or not bool((torch.isfinite(w) & (w > 0)).all()):
        raise ItdError("a timestep proposal must be a (T,) vector of positive finite weights")
    return w / w.sum()


def stratified_timesteps(
    proposal: Tensor, count: int, batch: int, generator: torch.Generator | None = None
) -> TimestepDraw:
    """K/2 equal-probability strata of the proposal's CDF, two inverse-CDF draws in each (Cochran 1977, §5.5)."""
    if count < 2 or count % 2:
        raise ItdError(f"the stratified sampler needs an even number of timesteps per image, at least 2, got {count}")
    if batch < 1:
        raise ItdError(f"the stratified sampler needs at least one image, got {batch}")
    q = _normalised(proposal)
    device = generator.device if generator is not None else q.device
    u = torch.rand(batch, count, generator=generator, dtype=F64, device=device).to(q.device)
    stratum = torch.div(torch.arange(count, device=q.device), 2, rounding_mode="floor")
    u = (stratum + u) / (count // 2)
    indices = torch.searchsorted(q.cumsum(0), u, right=True).clamp_max(q.numel() - 1)
    return TimestepDraw(indices, 1.0 / (count * q[indices]))


def stratified_estimate(draw: TimestepDraw, terms: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_k y_k with y = w L(t), unbiased for Σ_t L_t, and its standard error √Σ_i (y_{2i} − y_{2i+1})², per image."""
    y = draw.weights * terms.to(device=draw.weights.device, dtype=F64)
    pairs = y.reshape(y.shape[0], -1, 2)
    return y.sum(1), ((pairs[..., 0] - pairs[..., 1]) ** 2).sum(1).sqrt()
