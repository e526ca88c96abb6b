"""The analytic optimal linear denoiser of a Gaussian reference N(μ, Σ) as a torch module (spec §5)."""

from __future__ import annotations

import torch
from torch import Tensor

from itdcli.core.gaussian import GaussianReference


class GaussianDenoiser(torch.nn.Module):
    """ε̂_G(z, γ) of N(μ, Σ): the Bayes-optimal denoiser when the data are that Gaussian."""

    mean: Tensor
    eigvecs: Tensor
    eigvals: Tensor

    def __init__(self, reference: GaussianReference) -> None:
        """Keep the reference's mean and spectrum as buffers so `.to(device)` moves them."""
        super().__init__()
        self.register_buffer("mean", reference.mean)
        self.register_buffer("eigvecs", reference.eigvecs)
        self.register_buffer("eigvals", reference.eigvals)

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """ε̂_G(z, γ) computed in float64 and returned in z's dtype."""
        ref = GaussianReference(self.mean, self.eigvecs, self.eigvals)
        return ref.eps_hat(z, logsnr)
