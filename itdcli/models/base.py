"""The one interface every model is turned into: eps_hat = denoiser(z, logsnr) (spec models.md §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from itdcli.core.kinds import VarianceKind


@runtime_checkable
class Denoiser(Protocol):
    """A noise predictor: z (B, ...) float32 on the [−1, 1] scale, logSNR (B,) float64 → ε̂ shaped like z.

    logSNR arrives in float64 so that time maps keep their precision (spec §11.1); cast it if the
    network needs float32.
    """

    def __call__(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """Predict the channel noise ε from z = a_γ x + b_γ ε."""
        ...


@dataclass(frozen=True)
class DiscreteTime:
    """A model's discrete schedule for the variational bound: ᾱ_t (T,), its p(x_{t−1}|x_t) variance, its origin."""

    alphas_cumprod: Tensor
    variance: VarianceKind
    source: str

    @property
    def logsnr(self) -> Tensor:
        """log ᾱ_t/(1 − ᾱ_t) per step, float64 (T,)."""
        abar = self.alphas_cumprod.to(torch.float64)
        return torch.log(abar) - torch.log1p(-abar)


def ddpm_linear(steps: int = 1000) -> Tensor:
    """ᾱ_t of Ho et al. 2020's linear schedule, β from 1e-4 to 0.02 over `steps` (float64)."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


DEFAULT_DISCRETE_TIME = DiscreteTime(
    ddpm_linear(),
    "fixed_large",
    "default (the model declares no schedule): DDPM linear β 1e-4…0.02, T = 1000, variance fixed_large",
)


def discrete_time(model: object) -> DiscreteTime:
    """The schedule a model declares (`model.discrete_time`), else the documented default (docs/math.md)."""
    declared = getattr(model, "discrete_time", None)
    return declared if isinstance(declared, DiscreteTime) else DEFAULT_DISCRETE_TIME


def outputs(model: Denoiser, z: Tensor, logsnr: Tensor) -> tuple[Tensor, Tensor | None]:
    """ε̂ and, for a model with a learned variance, its interpolation channels v ∈ [−1, 1] (Nichol & Dhariwal 2021)."""
    both = getattr(model, "outputs", None)
    if callable(both):
        eps, v = both(z, logsnr)
        return eps, v
    return model(z, logsnr), None
