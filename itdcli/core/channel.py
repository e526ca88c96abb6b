"""The variance-preserving Gaussian channel in logSNR and the ε-unit errors of projected estimators (spec §3, §11.1)."""

from __future__ import annotations

import torch
from torch import Tensor


def _per_sample(logsnr: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) logSNR so that it broadcasts over the sample dimensions of `like`."""
    return logsnr.reshape(-1, *([1] * (like.dim() - 1)))


def gains(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Channel gains a = √σ(γ), b = √σ(−γ), with a² + b² = 1 and a²/b² = e^γ (spec §1)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def noisy(x: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """Channel output z = a_γ x + b_γ ε, one logSNR per sample (spec §3)."""
    a, b = gains(_per_sample(logsnr, x))
    return a * x + b * eps


def x_hat(z: Tensor, eps_hat: Tensor, logsnr: Tensor) -> Tensor:
    """Data estimate from a noise estimate, x̂ = √(1+e^{−γ}) z − e^{−γ/2} ε̂ (spec §3)."""
    g = _per_sample(logsnr, z)
    return torch.sqrt(1 + torch.exp(-g)) * z - torch.exp(-g / 2) * eps_hat


def _sum_sample(t: Tensor) -> Tensor:
    """Sum over every dimension but the first, in float64."""
    return t.to(torch.float64).flatten(1).sum(1)


def mse_eps(eps: Tensor, eps_hat: Tensor) -> Tensor:
    """Unprojected ε-error ‖ε − ε̂‖² per sample, summed over dimensions (spec §3, §11.1)."""
    return _sum_sample((eps.to(torch.float64) - eps_hat.to(torch.float64)) ** 2)


def mse_clamped(resid: Tensor, x: Tensor, logsnr: Tensor, lo: float = -1.0, hi: float = 1.0) -> Tensor:
    """ε-error of x̂ clamped to [lo, hi], in residual form u = ε − ε̂ without cancellation (spec §11.1)."""
    g = _per_sample(logsnr, resid).to(torch.float64)
    scale = torch.exp(g / 2)
    x64 = x.to(torch.float64)
    return _sum_sample(torch.clamp(resid.to(torch.float64), scale * (lo - x64), scale * (hi - x64)) ** 2)


def mse_cell(resid: Tensor, eps: Tensor, x: Tensor, logsnr: Tensor, levels: int) -> Tensor:
    """ε-error of E[x | z] for x uniform on the grid cell of x̂'s nearest level: (ε + M(α, β))² (docs/math.md).

    For dequantized data x̃ = x + δ(u − ½): with k̂ the level nearest x̂, z/a_γ is N(x̃, e^{−γ}) and the cell is
    [c − δ/2, c + δ/2], c = −1 + k̂δ, so the posterior is a normal truncated to it, with standardized ends
    α, β = e^{γ/2}(c ∓ δ/2 − x̃) − ε and mean offset M = (φ(α) − φ(β))/(Φ(β) − Φ(α)) in units of e^{−γ/2}.
    """
    g = _per_sample(logsnr, resid).to(torch.float64)
    scale = torch.exp(g / 2)
    x64, e64 = x.to(torch.float64), eps.to(torch.float64)
    delta = 2.0 / (levels - 1)
    x_hat = x64 + resid.to(torch.float64) / scale
    centre = -1 + torch.clamp(torch.round((x_hat + 1) / delta), 0, levels - 1) * delta
    low = scale * (centre - delta / 2 - x64) - e64
    high = scale * (centre + delta / 2 - x64) - e64
    return _sum_sample((e64 + truncated_normal_mean(low, high)) ** 2)


def truncated_normal_mean(low: Tensor, high: Tensor) -> Tensor:
    """Mean of N(0, 1) truncated to [low, high], (φ(low) − φ(high))/(Φ(high) − Φ(low)), stable in either tail."""
    flip = low + high > 0  # reflect so that the interval sits on the left, where Φ has relative precision
    a = torch.where(flip, -high, low)
    b = torch.where(flip, -low, high)
    log_b = torch.special.log_ndtr(b)
    log_mass = log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))
    mean = torch.exp(-0.5 * a**2 - log_mass) - torch.exp(-0.5 * b**2 - log_mass)
    mean = mean / (2 * torch.pi) ** 0.5
    return torch.where(flip, -mean, mean).clamp(low, high)


def _bin_offset(resid: Tensor, logsnr: Tensor, levels: int) -> Tensor:
    """Offset of x̂ from x in bins, r = e^{−γ/2} u / δ with δ = 2/(L−1)."""
    g = _per_sample(logsnr, resid).to(torch.float64)
    return torch.exp(-g / 2) * resid.to(torch.float64) * ((levels - 1) / 2)


def mse_rounded_hard(resid: Tensor, k: Tensor, logsnr: Tensor, levels: int) -> Tensor:
    """ε-error of x̂ rounded to the nearest grid level and clamped, e^γ δ² Σ j² (spec §7, §11.1)."""
    k64 = k.to(torch.float64)
    j = torch.clamp(torch.round(_bin_offset(resid, logsnr, levels)), -k64, levels - 1 - k64)
    delta = 2.0 / (levels - 1)
    return torch.exp(logsnr.to(torch.float64)) * delta**2 * _sum_sample(j**2)


def soft_window(logsnr_min: float, levels: int, n_sigma: float = 8.0) -> int:
    """Bins each side of the nearest one that hold all but e^{−n²/2} of the soft-rounding mass (spec §11.2)."""
    spread = (1.0 + torch.exp(torch.tensor(logsnr_min, dtype=torch.float64))) ** -0.5
    return min(levels - 1, int(torch.ceil(n_sigma * spread * (levels - 1) / 2).item()) + 1)


def mse_rounded_soft(resid: Tensor, k: Tensor, logsnr: Tensor, levels: int) -> Tensor:
    """ε-error of the soft-rounded x̂ = Σ π_k b_k, π ∝ exp(−½(1+e^γ)(x̂−b_k)²), over a window of bins (§7, §11.2).

    The window holds the nearest bins only and is swept with a running (online) softmax, so no
    tensor with one axis per bin is ever built.
    """
    r = _bin_offset(resid, logsnr, levels)
    k64 = k.to(torch.float64)
    lo, hi = -k64, levels - 1 - k64
    centre = torch.clamp(torch.round(r), lo, hi)
    g = _per_sample(logsnr, resid).to(torch.float64)
    precision = (1 + torch.exp(g)) * (2.0 / (levels - 1)) ** 2
    run_max = torch.full_like(r, -torch.inf)
    run_sum = torch.zeros_like(r)
    run_mean = torch.zeros_like(r)
    width = soft_window(float(logsnr.min()), levels)
    for off in range(-width, width + 1):
        j = centre + off
        logit = torch.where((j >= lo) & (j <= hi), -0.5 * precision * (r - j) ** 2, -torch.inf)
        new_max = torch.maximum(run_max, logit)
        keep = torch.exp(run_max - new_max).nan_to_num(0.0)
        add = torch.exp(logit - new_max).nan_to_num(0.0)
        run_sum, run_mean = run_sum * keep + add, run_mean * keep + add * j
        run_max = new_max
    offset = run_mean / run_sum
    return torch.exp(logsnr.to(torch.float64)) * (2.0 / (levels - 1)) ** 2 * _sum_sample(offset**2)
