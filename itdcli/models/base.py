"""The one interface every model is turned into: eps_hat = denoiser(z, logsnr) (spec models.md §1)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """A noise predictor: z (B, ...) on the [−1, 1] data scale and a per-sample logSNR (B,) → ε̂ shaped like z."""

    def __call__(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """Predict the channel noise ε from z = a_γ x + b_γ ε."""
        ...
