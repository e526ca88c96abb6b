"""The one interface every model is turned into: eps_hat = denoiser(z, logsnr) (spec models.md §1)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """A noise predictor: z (B, ...) float32 on the [−1, 1] scale, logSNR (B,) float64 → ε̂ shaped like z.

    logSNR arrives in float64 so that time maps keep their precision (spec §11.1); cast it if the
    network needs float32.
    """

    def __call__(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """Predict the channel noise ε from z = a_γ x + b_γ ε."""
        ...
