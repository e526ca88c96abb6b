"""logSNR proposals for the importance-sampled I-MMSE integral: truncated logistic and uniform (spec §6.2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

F64 = torch.float64
PAPER_SCALE_CONSTANT = 3 / math.pi
MOMENT_SCALE_CONSTANT = 3 / math.pi**2

ProposalKind = Literal["logistic", "uniform"]
PointScheme = Literal["stratified", "iid"]


@dataclass(frozen=True)
class Proposal:
    """A density p(γ) on [logsnr_min, logsnr_max]: a logistic(loc, scale) truncated to the range, or uniform."""

    kind: ProposalKind
    loc: float
    scale: float
    logsnr_min: float
    logsnr_max: float

    def __post_init__(self) -> None:
        """Reject empty ranges and non-positive scales."""
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"empty logSNR range [{self.logsnr_min}, {self.logsnr_max}]")
        if not self.scale > 0:
            raise ValueError(f"proposal scale must be positive, got {self.scale}")

    def _edges(self) -> tuple[float, float]:
        """Logistic CDF σ((γ − loc)/scale) at both ends of the range."""
        lo = 1 / (1 + math.exp(-(self.logsnr_min - self.loc) / self.scale))
        hi = 1 / (1 + math.exp(-(self.logsnr_max - self.loc) / self.scale))
        return lo, hi

    def icdf(self, u: Tensor) -> Tensor:
        """Inverse CDF: γ for u ∈ (0, 1), via q = σ(v_L) + u (σ(v_R) − σ(v_L)), γ = loc + scale·logit(q)."""
        u = u.to(F64)
        if self.kind == "uniform":
            return self.logsnr_min + u * (self.logsnr_max - self.logsnr_min)
        lo, hi = self._edges()
        return self.loc + self.scale * torch.logit(lo + u * (hi - lo))

    def density(self, logsnr: Tensor) -> Tensor:
        """p(γ) on the range: σ(v)σ(−v) / (scale (σ(v_R) − σ(v_L))) with v = (γ − loc)/scale, or 1/width."""
        g = logsnr.to(F64)
        if self.kind == "uniform":
            return torch.full_like(g, 1 / (self.logsnr_max - self.logsnr_min))
        lo, hi = self._edges()
        v = (g - self.loc) / self.scale
        return torch.sigmoid(v) * torch.sigmoid(-v) / (self.scale * (hi - lo))

    def weight(self, logsnr: Tensor) -> Tensor:
        """Importance weight w = 1/p(γ), so that E_p[w f] = ∫ f dγ over the range (spec §6.2)."""
        return 1 / self.density(logsnr)


def logistic_from_spectrum(
    log_eigvals: Tensor,
    scale_constant: float = PAPER_SCALE_CONSTANT,
    clip: float = 4.0,
    logsnr_min: float | None = None,
    logsnr_max: float | None = None,
) -> Proposal:
    """loc = −mean log λ, scale = √(1 + c·Var log λ), default range loc ± clip·scale (spec §6.2)."""
    loc = -float(log_eigvals.to(F64).mean())
    var = float(log_eigvals.to(F64).var()) if log_eigvals.numel() > 1 else 0.0
    scale = math.sqrt(1 + scale_constant * var)
    lo = loc - clip * scale if logsnr_min is None else logsnr_min
    hi = loc + clip * scale if logsnr_max is None else logsnr_max
    return Proposal("logistic", loc, scale, lo, hi)


def cdf_points(points: int, scheme: PointScheme, generator: torch.Generator) -> Tensor:
    """Points in CDF space for one image: i.i.d. U(0,1) sorted, or one uniform draw in each of `points` strata."""
    u = torch.rand(points, generator=generator, dtype=F64)
    if scheme == "iid":
        return u.sort().values
    return (torch.arange(points, dtype=F64) + u) / points
