"""I-MMSE estimators of −log p(x) and −log P(x) from per-image error arrays on per-image logSNR points (spec §7).

Every array is (N, J): image n, point j, with γ_nj drawn for image n alone. Each estimate carries two
standard errors: the Monte Carlo error of the mean over *these* images (from the spread of the integrand
within groups of point columns, the strata of two points) and the sampling error std/√N that also counts
how images differ (spec §7.7). In each logSNR bin the denoiser is chosen among candidates (the model's
projections, the Gaussian reference's linear denoiser) from the errors of *other* images, and so are the
slopes of the control variates and the mean curve subtracted from each integrand, so that no fit looks at
the image it corrects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from itdcli.core.kinds import Selection

F64 = torch.float64


@dataclass(frozen=True)
class Estimate:
    """Per-image values (nats), their Monte Carlo variances and those variances' effective degrees of freedom."""

    per_image: Tensor
    mc_var: Tensor
    df: Tensor | None = None

    @property
    def mean(self) -> float:
        """Dataset mean in nats per image."""
        return float(self.per_image.mean())

    @property
    def stderr(self) -> float:
        """Monte Carlo standard error of the mean over these images, √(Σ_n var_n)/N (nan when unknown)."""
        n = self.per_image.numel()
        return float(self.mc_var.sum().clamp_min(0).sqrt() / n) if bool(torch.isfinite(self.mc_var).all()) else math.nan

    @property
    def sampling_stderr(self) -> float:
        """Standard error as an estimate for the images' population, std/√N (nan for one image)."""
        n = self.per_image.numel()
        return float(self.per_image.std() / math.sqrt(n)) if n > 1 else math.nan

    def shifted(self, per_image: Tensor) -> Estimate:
        """The same Monte Carlo error around other per-image values (a constant or exact term added)."""
        return Estimate(per_image, self.mc_var, self.df)


def crossfit_folds(n: int, folds: int, generator: torch.Generator) -> Tensor:
    """A seeded random assignment of n images to `folds` balanced folds."""
    return torch.randperm(n, generator=generator) % folds


def choose(errors: Tensor, folds: Tensor, selection: Selection, bins: Tensor) -> Tensor:
    """Per cell, the candidate (axis 0 of `errors`, (K, N, J)) with the lowest mean error in the cell's logSNR bin.

    `bins` (N, J) assigns cells to logSNR bins, so that rounds of any size share one choice per bin.
    `crossfit`: means over the images of the other folds (held out); `same`: over all images (the paper's
    rule, optimistically biased); `none`: always candidate 0. A bin without cells keeps candidate 0.
    """
    k, n, j = errors.shape
    if selection == "none" or k == 1:
        return torch.zeros(n, j, dtype=torch.long)
    if selection == "same":
        return _best_per_bin(errors, bins, torch.ones(n, dtype=torch.bool))[bins]
    choice = torch.zeros(n, j, dtype=torch.long)
    for fold in range(int(folds.max()) + 1):
        rows = folds == fold
        choice[rows] = _best_per_bin(errors, bins, ~rows)[bins[rows]]
    return choice


def _best_per_bin(errors: Tensor, bins: Tensor, rows: Tensor) -> Tensor:
    """Per bin, the candidate with the lowest mean error over the cells of the images `rows` (0 where none)."""
    k, nbins = errors.shape[0], int(bins.max()) + 1
    b = bins[rows].reshape(-1)
    sums = torch.zeros(k, nbins, dtype=F64).index_add_(1, b, errors[:, rows].reshape(k, -1).to(F64))
    count = torch.bincount(b, minlength=nbins)
    means = torch.where(count > 0, sums / count.clamp_min(1), 0.0)
    return means.argmin(0)


def chosen(errors: Tensor, choice: Tensor) -> Tensor:
    """The chosen candidate's error in every cell, (N, J)."""
    return errors.gather(0, choice.unsqueeze(0)).squeeze(0)


@dataclass(frozen=True)
class CurveControl:
    """A crossfit piecewise-linear mean curve g(γ) on `knots`, subtracted from an integrand and integrated exactly.

    For any fixed g, E_p[w·g(γ)] = ∫ g dγ, so (1/J) Σ_j w_j (f_j − g(γ_j)) + ∫ g dγ stays unbiased for ∫ f dγ
    (a regression estimator, Owen, *Monte Carlo*, §8.9). The g of one fold is fitted to the other fold's
    integrand computed from `own`: errors whose denoiser choice and control variates were fitted within their
    own fold, so that g never depends on the draws of the images it corrects (crossfit choices would carry them
    back). With g close to the images' common curve, stratified points see only how each image departs from it.
    """

    logsnr: Tensor
    weight: Tensor
    folds: Tensor
    knots: Tensor
    own: Tensor
    smoothing: float = 1e-6

    def baseline(self, form: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """g(γ) in every cell (N, J) and ∫ g dγ per image (N,) for the integrand form(error), g from the other fold."""
        train_values = form(self.own)
        cells = torch.zeros_like(self.logsnr, dtype=F64)
        exact = torch.zeros(self.logsnr.shape[0], dtype=F64)
        for fold in range(int(self.folds.max()) + 1):
            train, rows = self.folds != fold, self.folds == fold
            if not train.any():
                continue
            g = self._fit(train_values[train], train)
            cells[rows] = self._at(g, self.logsnr[rows])
            exact[rows] = (0.5 * (g[1:] + g[:-1]) * self.knots.diff()).sum()
        return cells, exact

    def _hat(self, logsnr: Tensor) -> tuple[Tensor, Tensor]:
        """Each cell's left knot i and its linear-interpolation share λ of knot i + 1."""
        t = self.knots
        i = torch.clamp(torch.searchsorted(t, logsnr.contiguous(), right=True) - 1, 0, len(t) - 2)
        lam = ((logsnr - t[i]) / (t[i + 1] - t[i])).clamp(0, 1)
        return i, lam

    def _at(self, g: Tensor, logsnr: Tensor) -> Tensor:
        """The piecewise-linear curve with knot values g at each γ."""
        i, lam = self._hat(logsnr.to(F64))
        return (1 - lam) * g[i] + lam * g[i + 1]

    def _fit(self, values: Tensor, rows: Tensor) -> Tensor:
        """Knot values minimising Σ w²(f − g(γ))² (the variance of w·(f − g)) with a light second-difference penalty."""
        k = len(self.knots)
        i, lam = self._hat(self.logsnr[rows].reshape(-1).to(F64))
        w2, f = self.weight[rows].reshape(-1).to(F64) ** 2, values.reshape(-1).to(F64)
        a = torch.zeros(k * k, dtype=F64)
        for di, dj, v in ((0, 0, (1 - lam) ** 2), (0, 1, (1 - lam) * lam), (1, 0, (1 - lam) * lam), (1, 1, lam**2)):
            a.index_add_(0, (i + di) * k + i + dj, w2 * v)
        a = a.reshape(k, k)
        b = torch.zeros(k, dtype=F64).index_add_(0, i, w2 * (1 - lam) * f).index_add_(0, i + 1, w2 * lam * f)
        d = torch.diff(torch.eye(k, dtype=F64), 2, dim=0)
        penalty = self.smoothing * float(a.diagonal().mean()) + torch.finfo(F64).tiny
        g: Tensor = torch.linalg.solve(a + penalty * (d.T @ d + 1e-6 * torch.eye(k, dtype=F64)), b)
        return g


def integral(weight: Tensor, values: Tensor, groups: Tensor, baseline: tuple[Tensor, Tensor] | None = None) -> Estimate:
    """Importance-sampled ∫ f dγ per image, (1/J) Σ_j w_nj f_nj (spec §6.2), with its Monte Carlo variance.

    Columns in one group of `groups` (J,) are exchangeable draws: var = Σ_g n_g/(n_g−1) Σ_{j∈g} (y_j − ȳ_g)² / J²,
    unbiased for i.i.d. points and for stratified points drawn two to a stratum (`cdf_points`). A `baseline`
    (g per cell, its exact ∫ g dγ per image; `CurveControl.baseline`) is subtracted in every cell and added back.
    Each group's share v_g has n_g − 1 degrees of freedom; their sum has the Welch–Satterthwaite
    ν = (Σ v_g)² / Σ v_g²/(n_g − 1) (Satterthwaite 1946): few when one stratum holds the variance.
    """
    zero = torch.zeros((), dtype=F64)
    g, exact = baseline if baseline is not None else (zero, zero)
    y = weight.to(F64) * (values.to(F64) - g)
    j = y.shape[1]
    ids = torch.unique(groups, return_inverse=True)[1].to(y.device)
    size = torch.bincount(ids).to(F64)
    mean_g = torch.zeros(y.shape[0], len(size), dtype=F64).index_add_(1, ids, y) / size
    square = torch.zeros_like(mean_g).index_add_(1, ids, (y - mean_g[:, ids]) ** 2)
    factor = torch.where(size > 1, size / (size - 1).clamp_min(1), torch.nan)
    share = square * factor / j**2
    var = share.sum(1)
    df = var**2 / (share**2 / (size - 1).clamp_min(1)).sum(1).clamp_min(torch.finfo(F64).tiny)
    return Estimate(y.mean(1) + exact, var, df)


MIN_CELLS_PER_CONTROL = 10


def control_variate(values: Tensor, cvs: Tensor, weight: Tensor, bins: Tensor, folds: Tensor) -> Tensor:
    """values − Σ_c β_bc·cv_c per cell, for mean-zero control variates `cvs` (C, N, J) (Owen, *Monte Carlo*, §8.9).

    β_b is the least-squares fit of w·values on the controls' w·cv over the cells of logSNR bin b (`bins`,
    (N, J)) in the *other* crossfit folds, so each image's estimate stays unbiased and its variance estimate
    valid. A bin fits only its first min(C, cells / MIN_CELLS_PER_CONTROL) controls, so few cells never fit
    many slopes.
    """
    cvs = cvs.unsqueeze(0) if cvs.dim() == 2 else cvs
    y, x = (weight * values).to(F64), (weight * cvs).to(F64)
    nbins = int(bins.max()) + 1
    out = values.to(F64).clone()
    for fold in range(int(folds.max()) + 1):
        train, rows = folds != fold, folds == fold
        if not train.any():
            continue
        beta = _slopes(y[train], x[:, train], bins[train], nbins)
        out[rows] = _minus(values[rows], cvs[:, rows], beta, bins[rows])
    return out


def control_variate_in_sample(values: Tensor, cvs: Tensor, weight: Tensor, bins: Tensor) -> Tensor:
    """`control_variate` with the slopes fitted on the same cells they correct (for fits that stay in one fold)."""
    cvs = cvs.unsqueeze(0) if cvs.dim() == 2 else cvs
    beta = _slopes((weight * values).to(F64), (weight * cvs).to(F64), bins, int(bins.max()) + 1)
    return _minus(values, cvs, beta, bins)


def _minus(values: Tensor, cvs: Tensor, beta: Tensor, bins: Tensor) -> Tensor:
    """values − Σ_c β_bc·cv_c per cell, each cell taking the slopes of its bin b from `beta` (nbins, C)."""
    return values.to(F64) - (beta[bins] * cvs.to(F64).movedim(0, -1)).sum(-1)


def _slopes(y: Tensor, x: Tensor, bins: Tensor, nbins: int) -> Tensor:
    """Per bin, the least-squares slopes (nbins, C) of the centred y on the controls x (C, ...) of its cells."""
    c = x.shape[0]
    b, yt, xt = bins.reshape(-1), y.reshape(-1), x.reshape(c, -1).T
    count = torch.bincount(b, minlength=nbins)
    y_mean = torch.zeros(nbins, dtype=F64).index_add_(0, b, yt) / count.clamp_min(1)
    xtx = torch.zeros(nbins, c, c, dtype=F64).index_add_(0, b, xt[:, :, None] * xt[:, None, :])
    xty = torch.zeros(nbins, c, dtype=F64).index_add_(0, b, xt * (yt - y_mean[b])[:, None])
    beta = torch.zeros(nbins, c, dtype=F64)
    for k in range(nbins):
        m = min(c, int(count[k]) // MIN_CELLS_PER_CONTROL)
        if m:
            fit = torch.linalg.lstsq(xtx[k, :m, :m], xty[k, :m, None], rcond=1e-12, driver="gelsd")
            beta[k, :m] = fit.solution[:, 0]
    return beta
