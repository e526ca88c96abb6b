"""Gaussian reference N(μ, Σ): entropy, expected and pointwise MMSE, −log N, optimal linear denoiser (spec §4–§6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

F64 = torch.float64


def mmse_gaussian(logsnr: Tensor, eigvals: Tensor) -> Tensor:
    """Expected ε-MMSE of N(μ, Σ), mmse_G(γ) = Σ_i σ(γ + log λ_i), elementwise over γ (spec §4)."""
    return torch.sigmoid(logsnr.to(F64).unsqueeze(-1) + eigvals.to(F64).log()).sum(-1)


@dataclass(frozen=True)
class GaussianReference:
    """N(μ, U diag(λ) Uᵀ) in float64; every method takes flattened samples of dimension d."""

    mean: Tensor
    eigvecs: Tensor
    eigvals: Tensor

    @classmethod
    def fit(cls, x: Tensor, floor: float = 0.0) -> GaussianReference:
        """Mean and unbiased covariance of samples (N, d), eigh in float64, eigenvalues floored (spec §6.1)."""
        x64 = x.reshape(x.shape[0], -1).to(F64)
        if x64.shape[0] < 2:
            raise ValueError("fitting a Gaussian needs at least two samples")
        mean = x64.mean(0)
        centred = x64 - mean
        cov = centred.T @ centred / (x64.shape[0] - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        return cls(mean, eigvecs, eigvals.clamp_min(max(floor, torch.finfo(F64).tiny)))

    @classmethod
    def standard(cls, dim: int) -> GaussianReference:
        """The paper's N(0, I) reference (spec §4)."""
        return cls(torch.zeros(dim, dtype=F64), torch.eye(dim, dtype=F64), torch.ones(dim, dtype=F64))

    @property
    def dim(self) -> int:
        """Data dimension d."""
        return int(self.eigvals.numel())

    @property
    def log_eigvals(self) -> Tensor:
        """log λ_i."""
        return self.eigvals.log()

    def entropy(self) -> float:
        """Differential entropy H_G = (d/2) log 2πe + ½ Σ log λ_i, in nats (spec §4)."""
        return 0.5 * self.dim * math.log(2 * math.pi * math.e) + 0.5 * float(self.log_eigvals.sum())

    def mmse(self, logsnr: Tensor) -> Tensor:
        """Expected ε-MMSE mmse_G(γ) of this reference, elementwise over any shape of γ (spec §4)."""
        return mmse_gaussian(logsnr, self.eigvals)

    def whiten(self, x: Tensor) -> Tensor:
        """Eigen-coordinates y = Uᵀ(x − μ) of flattened samples (N, d) (spec §1)."""
        return (x.reshape(x.shape[0], -1).to(F64) - self.mean) @ self.eigvecs

    def nll(self, x: Tensor) -> Tensor:
        """Pointwise −log N(x; μ, Σ) in nats per sample (spec §4)."""
        y = self.whiten(x)
        quad = (y**2 / self.eigvals).sum(-1)
        return 0.5 * (self.dim * math.log(2 * math.pi) + self.log_eigvals.sum() + quad)

    def mmse_pointwise(self, y: Tensor, logsnr: Tensor) -> Tensor:
        """Pointwise ε-error of the optimal linear denoiser, Σ_i (e^γ y_i² + r_i²)/(1 + r_i)², r_i = e^γ λ_i (§5).

        `y` holds eigen-coordinates (..., d) from `whiten`; `logsnr` broadcasts against y's leading shape.
        """
        g = logsnr.to(F64).unsqueeze(-1)
        r = torch.exp(g + self.log_eigvals)
        return ((torch.exp(g) * y**2 + r**2) / (1 + r) ** 2).sum(-1)

    def error_draw(self, y: Tensor, eta: Tensor, logsnr: Tensor) -> Tensor:
        """ε-error of the optimal linear denoiser for one noise draw, Σ_i (r_i η_i − e^{γ/2} y_i)²/(1 + r_i)² (§5).

        `y` and `eta` = Uᵀε are eigen-coordinates (B, d); the mean over η ~ N(0, I) is `mmse_pointwise`.
        """
        g = logsnr.to(F64).unsqueeze(-1)
        r = torch.exp(g + self.log_eigvals)
        return (((r * eta.to(F64) - torch.exp(g / 2) * y) / (1 + r)) ** 2).sum(-1)

    def left_tail(self, logsnr_min: float, y: Tensor | None = None) -> Tensor:
        """½ ∫_{−∞}^{γ_L} of the Gaussian error: ½ Σ softplus(γ_L + log λ), or its pointwise form for y (derived).

        Pointwise, per dimension: ∫ (e^γ y² + r²)/(1+r)² dγ = (y²/λ − 1) σ(γ_L + log λ) + softplus(γ_L + log λ).
        """
        arg = logsnr_min + self.log_eigvals
        expected = torch.nn.functional.softplus(arg)
        if y is None:
            return 0.5 * expected.sum()
        return 0.5 * ((y**2 / self.eigvals - 1) * torch.sigmoid(arg) + expected).sum(-1)

    def eps_hat(self, z: Tensor, logsnr: Tensor) -> Tensor:
        """Optimal linear denoiser ε̂_G = b_γ^{−1} U diag(1/(1+r)) Uᵀ(z − a_γ μ) for (B, ...) z (spec §5)."""
        g = logsnr.to(F64).reshape(-1, 1)
        a, b = torch.sigmoid(g).sqrt(), torch.sigmoid(-g).sqrt()
        zeta = (z.reshape(z.shape[0], -1).to(F64) - a * self.mean) @ self.eigvecs
        shrunk = zeta / (1 + torch.exp(g + self.log_eigvals)) / b
        return (shrunk @ self.eigvecs.T).reshape(z.shape).to(z.dtype)
