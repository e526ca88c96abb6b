"""I-MMSE estimators of −log p(x) and −log P(x) from per-image error arrays on per-image logSNR points (spec §7).

Every array is (N, J): image n, point j, with γ_nj drawn for image n alone, so per-image values are
independent and the standard error of their mean is honest (spec §7.7). At each point column the
denoiser is chosen among candidates (the model's projections, the Gaussian reference's linear
denoiser) from the errors of *other* images, so the choice never looks at the image it scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

F64 = torch.float64
Selection = Literal["crossfit", "same", "none"]


@dataclass(frozen=True)
class Estimate:
    """Per-image values (nats) with their mean and honest standard error."""

    per_image: Tensor

    @property
    def mean(self) -> float:
        """Dataset mean in nats per image."""
        return float(self.per_image.mean())

    @property
    def stderr(self) -> float:
        """Standard error of the mean, std/√N over independent per-image values (nan for one image)."""
        n = self.per_image.numel()
        return float(self.per_image.std() / math.sqrt(n)) if n > 1 else math.nan


def crossfit_folds(n: int, folds: int, generator: torch.Generator) -> Tensor:
    """A seeded random assignment of n images to `folds` balanced folds."""
    return torch.randperm(n, generator=generator) % folds


def choose(errors: Tensor, folds: Tensor, selection: Selection) -> Tensor:
    """Per image and column, the candidate (axis 0 of `errors`, (K, N, J)) with the lowest mean error.

    `crossfit`: means over the images of the other folds (held out); `same`: over all images
    (the paper's rule, optimistically biased); `none`: always candidate 0.
    """
    k, n, j = errors.shape
    choice = torch.zeros(n, j, dtype=torch.long)
    if selection == "none" or k == 1:
        return choice
    if selection == "same":
        return errors.mean(1).argmin(0).expand(n, j).clone()
    for fold in range(int(folds.max()) + 1):
        held_out = folds != fold
        if held_out.any():
            choice[folds == fold] = errors[:, held_out].mean(1).argmin(0)
    return choice


def chosen(errors: Tensor, choice: Tensor) -> Tensor:
    """The chosen candidate's error in every cell, (N, J)."""
    return errors.gather(0, choice.unsqueeze(0)).squeeze(0)


def integral(weight: Tensor, values: Tensor) -> Tensor:
    """Importance-sampled ∫ f dγ over the range per image, (1/J) Σ_j w_nj f_nj (spec §6.2)."""
    return (weight.to(F64) * values.to(F64)).mean(1)


def nll_continuous(entropy: float, mmse_g: Tensor, weight: Tensor, err: Tensor) -> Estimate:
    """Paper form (C1): H_G − ½ ∫ (mmse_G(γ) − mmse(x, γ)) dγ per image (spec §4, §7.1)."""
    return Estimate(entropy - 0.5 * integral(weight, mmse_g - err))


def nll_continuous_pointwise(nll_g: Tensor, mmse_gx: Tensor, weight: Tensor, err: Tensor) -> Estimate:
    """Pointwise form (C2): −log N(x) − ½ ∫ (mmse_G(x, γ) − mmse(x, γ)) dγ per image (spec §4, §7.6)."""
    return Estimate(nll_g - 0.5 * integral(weight, mmse_gx - err))


def right_tail(logsnr_max: float, dim: int, levels: int) -> float:
    """Bound on ½∫_{γ_R}^∞ of the rounded error, 4d Σ_{j≥1} exp(−(j−½)² δ² e^{γ_R}/2) (derived, spec §7.4)."""
    delta = 2.0 / (levels - 1)
    j = torch.arange(1, levels, dtype=F64) - 0.5
    snr = torch.exp(torch.tensor(logsnr_max, dtype=F64))
    return float(4 * dim * torch.exp(-(j**2) * delta**2 * snr / 2).sum())


def nll_discrete(left_tail: Tensor, right: float, weight: Tensor, err: Tensor) -> Estimate:
    """Discrete (D): −log P(x) = ½ ∫ mmse(x, γ) dγ, with both tails added (spec §4, §7.4)."""
    return Estimate(left_tail + right + 0.5 * integral(weight, err))


def nll_dequantized(entropy: float, mmse_g: Tensor, weight: Tensor, err: Tensor, dim: int, levels: int) -> Estimate:
    """Uniform dequantization bound: (C1) on x + δ(u − ½) plus d·log(1/δ) nats (spec §2, §7.2)."""
    cont = nll_continuous(entropy, mmse_g, weight, err).per_image
    return Estimate(cont + dim * math.log((levels - 1) / 2))


def column_means(values: Tensor) -> Tensor:
    """Mean over images of each point column, (J,)."""
    return values.to(F64).mean(0)
