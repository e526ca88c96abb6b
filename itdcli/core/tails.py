"""Closed-form tails of the I-MMSE integrals outside [γ_L, γ_R], and the range they imply (docs/math.md, Tails).

Below γ_L every estimator uses the Gaussian reference's linear denoiser; above γ_R the continuous forms use
the identity decoder x̂ = z/a and the discrete form hard rounding of z/a to the grid. These are model-free
decoders whose errors integrate in closed form, so each tail is an exact term of a valid bound, and the range
is chosen so that each is at most a set number of nats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

F64 = torch.float64
SQRT_2PI = math.sqrt(2 * math.pi)


def _rounding_terms(logsnr_max: float, levels: int) -> Tensor:
    """h_i = [(1 − a_i²)Φ̄(a_i) + a_i φ(a_i)]/(i − ½), a_i = (i − ½)δe^{γ_R/2}, for i = 1 … L−1 (derived)."""
    delta = 2.0 / (levels - 1)
    half = torch.arange(1, levels, dtype=F64) - 0.5
    a = half * delta * math.exp(logsnr_max / 2)
    # Φ̄(a) = ½ erfcx(a/√2) e^{−a²/2}: the Gaussian factor is taken out of both terms
    inner = (1 - a**2) * 0.5 * torch.special.erfcx(a / math.sqrt(2)) + a / SQRT_2PI
    terms: Tensor = torch.exp(-(a**2) / 2) * inner.clamp_min(0) / half
    return terms


def rounding_tail(logsnr_max: float, codes: Tensor, levels: int) -> Tensor:
    """½∫_{γ_R}^∞ e^γ‖x − round(z/a)‖² dγ per image, exact for hard rounding clamped to the grid (derived).

    A pixel at level k can be rounded up to L−1−k bins and down to k bins: Σ_{i≤L−1−k} h_i + Σ_{i≤k} h_i.
    `codes` (N, ...) hold the integer levels.
    """
    cum = torch.cat([torch.zeros(1, dtype=F64), _rounding_terms(logsnr_max, levels).cumsum(0)])
    k = codes.reshape(codes.shape[0], -1).long()
    return (cum[k] + cum[levels - 1 - k]).sum(1)


def rounding_tail_bound(logsnr_max: float, dim: int, levels: int) -> float:
    """The largest rounding tail any image of `dim` pixels can have: every pixel in the middle of the grid."""
    cum = torch.cat([torch.zeros(1, dtype=F64), _rounding_terms(logsnr_max, levels).cumsum(0)])
    k = torch.arange(levels)
    return dim * float((cum[k] + cum[levels - 1 - k]).max())


def identity_tail(logsnr_max: float, log_eigvals: Tensor) -> float:
    """−½∫_{γ_R}^∞ (mmse_G − d) dγ = ½ Σ softplus(−γ_R − log λ_i): form (C1) with x̂ = z/a above γ_R (derived)."""
    return 0.5 * float(torch.nn.functional.softplus(-logsnr_max - log_eigvals.to(F64)).sum())


def identity_tail_pointwise(logsnr_max: float, y: Tensor, eigvals: Tensor) -> Tensor:
    """−½∫_{γ_R}^∞ (mmse_G(x, γ) − d) dγ per image, ½ Σ [log(1 + 1/r) + (1 − y²/λ)/(1 + r)], r = e^{γ_R}λ (derived).

    `y` (N, d) are eigen-coordinates; this is form (C2) with the identity decoder above γ_R.
    """
    lam = eigvals.to(F64)
    r = math.exp(logsnr_max) * lam
    return 0.5 * (torch.log1p(1 / r) + (1 - y.to(F64) ** 2 / lam) / (1 + r)).sum(-1)


def gaussian_left_tail(logsnr_min: float, log_eigvals: Tensor) -> float:
    """½∫_{−∞}^{γ_L} mmse_G dγ = ½ Σ softplus(γ_L + log λ_i): the most any left tail can hold (spec §7.4)."""
    return 0.5 * float(torch.nn.functional.softplus(logsnr_min + log_eigvals.to(F64)).sum())


def left_tail_c1(logsnr_min: float, second_moment: Tensor, eigvals: Tensor) -> Tensor:
    """½∫_{−∞}^{γ_L} (mmse_G(x, γ) − mmse_G(γ)) dγ = ½ Σ (E y²/λ − 1) σ(γ_L + log λ) per image (derived).

    Form (C1) with the linear denoiser below γ_L; `second_moment` (N, d) is y², or its mean over the
    dequantization offsets.
    """
    lam = eigvals.to(F64)
    return 0.5 * ((second_moment.to(F64) / lam - 1) * torch.sigmoid(logsnr_min + lam.log())).sum(-1)


def solve_end(tail: Callable[[float], float], limit: float, start: float, step: float) -> float:
    """The γ where `tail`, falling in the direction of `step`, crosses `limit`: bracketed from `start`, bisected."""
    above, below = start, start
    if tail(start) > limit:
        while tail(below) > limit:
            above, below, step = below, below + step, 2 * step
            if abs(below) > 1e4:
                raise ValueError("no logSNR within ±10⁴ brings the tail below its limit")
    else:
        while tail(above) <= limit:
            below, above, step = above, above - step, 2 * step
            if abs(above) > 1e4:
                return below  # the tail never exceeds the limit
    for _ in range(60):
        mid = 0.5 * (above + below)
        above, below = (mid, below) if tail(mid) > limit else (above, mid)
    return below
