"""Mean-zero moments of the noise draw per class of pixel, control variates for projected errors (Owen §8.9).

A projected denoiser's ε-error is a clamped quadratic in the noise. Where a pixel's value sits at a bound of
the clamp range, the clamp cuts one side of its error off; inside the range it acts on both. So per class of
pixel (at the lower bound, inside, at the upper bound) the sums of ε² − 1, ε²·1{ε>0} − ½, ε and
ε·1{ε>0} − φ(0) follow the error closely, and each has mean zero exactly for ε ~ N(0, I).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64
PHI0 = 1 / math.sqrt(2 * math.pi)  # E[ε·1{ε>0}] for ε ~ N(0, 1)
CLASSES = ("low", "inside", "high")
MOMENTS = ("sq", "sq_pos", "lin", "lin_pos")  # in order of use when few cells allow only some of them
NAMES = tuple(f"ctl_{m}_{c}" for m in MOMENTS for c in CLASSES)


def noise_moments(eps: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """(B, 12) float64, columns in NAMES order: per pixel class, Σ(ε² − 1), Σ(ε²1{ε>0} − ½), Σε, Σ(ε1{ε>0} − φ(0)).

    `eps` (B, ...) is the noise draw; `low` and `high` (B, ...) mark pixels at the lower and upper bound of the
    clamp range (all False for continuous data, whose errors are not clamped).
    """
    e = eps.reshape(eps.shape[0], -1).to(F64)
    lo = low.reshape(e.shape).to(F64)
    hi = high.reshape(e.shape).to(F64)
    masks = (lo, 1 - lo - hi, hi)
    pos = (e > 0).to(F64)
    terms = (e**2 - 1, e**2 * pos - 0.5, e, e * pos - PHI0)
    return torch.stack([(t * m).sum(1) for t in terms for m in masks], 1)


DEQ_NAMES = tuple(f"deq_{m}_{c}" for m in ("sq", "cross") for c in CLASSES)


def dequantization_moments(u: Tensor, eps: Tensor, logsnr: Tensor, delta: float, low: Tensor, high: Tensor) -> Tensor:
    """(B, 6) float64 in DEQ_NAMES order: per pixel class, e^γδ²Σ((u−½)² − 1/12) and e^{γ/2}δΣ(u−½)ε.

    For x̃ = x + δ(u − ½), a denoiser that snaps x̂ to the grid has ε-error close to e^γ‖δ(u − ½)‖²
    plus a cross term with the noise; both moments have mean zero for u ~ U[0, 1) independent of ε.
    """
    v = (u.reshape(u.shape[0], -1).to(F64) - 0.5) * delta
    e = eps.reshape(v.shape).to(F64)
    g = logsnr.to(F64).reshape(-1, 1)
    lo = low.reshape(v.shape).to(F64)
    hi = high.reshape(v.shape).to(F64)
    masks = (lo, 1 - lo - hi, hi)
    terms = (torch.exp(g) * (v**2 - delta**2 / 12), torch.exp(g / 2) * v * e)
    return torch.stack([(t * m).sum(1) for t in terms for m in masks], 1)
