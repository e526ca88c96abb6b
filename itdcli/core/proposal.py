"""logSNR proposals for the importance-sampled I-MMSE integral: truncated logistic, uniform, adaptive (spec §6.2).

The adaptive proposal is piecewise constant on bins of the base proposal's quantiles; its mass per bin
follows the standard deviation of the integrands about their bin mean, measured in a pilot pass: what
stratified points leave of the variance, so this is the optimal (Neyman) allocation of points (Cochran,
*Sampling techniques*, 1977, §5.5; Owen, *Monte Carlo theory, methods and examples*, §9.2), mixed with the
base proposal so that no region loses its coverage (defensive importance sampling, Hesterberg 1995).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from itdcli.core.kinds import PAPER_SCALE_CONSTANT, PointScheme, ProposalKind

F64 = torch.float64
MOMENT_SCALE_CONSTANT = 3 / math.pi**2


@dataclass(frozen=True)
class Proposal:
    """A density p(γ) on [logsnr_min, logsnr_max]: a truncated logistic(loc, scale), uniform, or adaptive.

    An adaptive proposal is piecewise constant: probability `mass[i]` spread evenly over [edges[i], edges[i+1]];
    loc and scale are those of the base proposal it was fitted from.
    """

    kind: ProposalKind
    loc: float
    scale: float
    logsnr_min: float
    logsnr_max: float
    edges: tuple[float, ...] = ()
    mass: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        """Reject empty ranges and non-positive scales."""
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"empty logSNR range [{self.logsnr_min}, {self.logsnr_max}]")
        if not self.scale > 0:
            raise ValueError(f"proposal scale must be positive, got {self.scale}")
        if self.kind == "adaptive" and (len(self.edges) != len(self.mass) + 1 or min(self.mass, default=0) <= 0):
            raise ValueError("an adaptive proposal needs len(mass) + 1 edges and positive masses")

    def _edges(self) -> tuple[float, float]:
        """Logistic CDF σ((γ − loc)/scale) at both ends of the range."""
        lo = 1 / (1 + math.exp(-(self.logsnr_min - self.loc) / self.scale))
        hi = 1 / (1 + math.exp(-(self.logsnr_max - self.loc) / self.scale))
        return lo, hi

    def icdf(self, u: Tensor) -> Tensor:
        """Inverse CDF: γ for u ∈ (0, 1), via q = σ(v_L) + u (σ(v_R) − σ(v_L)), γ = loc + scale·logit(q)."""
        u = u.to(F64)
        if self.kind == "adaptive":
            edges, mass = self._table()
            cum = torch.cat([torch.zeros(1, dtype=F64), mass.cumsum(0)])
            i = torch.clamp(torch.searchsorted(cum, u, right=True) - 1, 0, len(mass) - 1)
            frac = ((u - cum[i]) / mass[i]).clamp(0, 1)
            return edges[i] + frac * (edges[i + 1] - edges[i])
        if self.kind == "uniform":
            return self.logsnr_min + u * (self.logsnr_max - self.logsnr_min)
        lo, hi = self._edges()
        return self.loc + self.scale * torch.logit(lo + u * (hi - lo))

    def density(self, logsnr: Tensor) -> Tensor:
        """p(γ) on the range: σ(v)σ(−v) / (scale (σ(v_R) − σ(v_L))) with v = (γ − loc)/scale, or 1/width."""
        g = logsnr.to(F64)
        if self.kind == "adaptive":
            edges, mass = self._table()
            i = torch.clamp(torch.searchsorted(edges, g, right=True) - 1, 0, len(mass) - 1)
            return mass[i] / (edges[i + 1] - edges[i])
        if self.kind == "uniform":
            return torch.full_like(g, 1 / (self.logsnr_max - self.logsnr_min))
        lo, hi = self._edges()
        v = (g - self.loc) / self.scale
        return torch.sigmoid(v) * torch.sigmoid(-v) / (self.scale * (hi - lo))

    def _table(self) -> tuple[Tensor, Tensor]:
        """Bin edges and normalised bin masses of an adaptive proposal, float64."""
        mass = torch.tensor(self.mass, dtype=F64)
        return torch.tensor(self.edges, dtype=F64), mass / mass.sum()

    def quantile_edges(self, count: int) -> Tensor:
        """The edges of `count` bins of equal probability, the outer two exactly the ends of the range."""
        edges = self.icdf(torch.linspace(0, 1, count + 1, dtype=F64))
        edges[0], edges[-1] = self.logsnr_min, self.logsnr_max
        return edges

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
    """Points in CDF space for one image: i.i.d. U(0,1) sorted, or stratified two to a stratum.

    Stratified: points 2i and 2i+1 are independent uniform draws in [2i/J, (2i+2)/J); an odd last point has
    [(J−1)/J, 1) to itself. Every point stands for 1/J of the mass, and two independent points per stratum
    make the within-stratum variance, hence the Monte Carlo error, estimable without bias.
    """
    u = torch.rand(points, generator=generator, dtype=F64)
    if scheme == "iid":
        return u.sort().values
    base = (torch.arange(points) // 2 * 2).to(F64) / points
    width = torch.full((points,), 2.0 / points, dtype=F64)
    if points % 2:
        width[-1] = 1.0 / points
    return base + u * width


def fit_adaptive(
    base: Proposal, logsnr: Tensor, integrands: list[Tensor], bins: int = 24, defensive: float = 0.25
) -> Proposal:
    """Piecewise-constant p(γ) ∝ the integrands' spread about their bin means, averaged, mixed with `base`.

    `logsnr` and each integrand hold pilot cells drawn from `base` (any shape, matching). Bins are the base
    proposal's quantiles, so each holds about the same number of pilot cells; a bin without cells keeps the
    base mass. Each integrand's optimal density gets an equal share, so every estimator keeps at least
    (1 − defensive)/len(integrands) of its own.
    """
    edges = base.quantile_edges(bins)
    g = logsnr.reshape(-1).to(F64)
    which = torch.clamp(torch.searchsorted(edges, g, right=True) - 1, 0, bins - 1)
    count = torch.bincount(which, minlength=bins).to(F64)
    width = edges[1:] - edges[:-1]
    base_mass = torch.full((bins,), 1.0 / bins, dtype=F64)
    optimal = torch.zeros(bins, dtype=F64)
    for f in integrands:
        fv = f.reshape(-1).to(F64)
        mean = torch.zeros(bins, dtype=F64).index_add_(0, which, fv) / count.clamp_min(1)
        square = torch.zeros(bins, dtype=F64).index_add_(0, which, (fv - mean[which]) ** 2)
        mass = (square / count.clamp_min(1)).sqrt() * width
        mass = torch.where(count > 0, mass / mass.sum(), base_mass) if float(mass.sum()) > 0 else base_mass
        optimal += mass / mass.sum() / len(integrands)
    mass = (1 - defensive) * optimal + defensive * base_mass
    return Proposal(
        "adaptive", base.loc, base.scale, base.logsnr_min, base.logsnr_max, tuple(edges.tolist()), tuple(mass.tolist())
    )


def stratum_groups(points: int, scheme: PointScheme) -> Tensor:
    """Variance groups of one round's point columns: the strata of two points (Cochran 1977, §5.5), or one group.

    An odd last stratified point, alone in its stratum, joins the pair before (collapsed strata, conservative
    for that group only); i.i.d. points form one group.
    """
    if scheme == "iid" or points < 2:
        return torch.zeros(points, dtype=torch.long)
    return torch.clamp(torch.arange(points) // 2, max=points // 2 - 1)
