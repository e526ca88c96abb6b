"""Exact posterior-mean denoisers and densities of diagonal Gaussian mixtures, written independently of itdcli.

A component with zero variance is a point mass, so a uniform law on K grid points is a mixture too.
"""

import math

import torch

F64 = torch.float64


class MixtureDenoiser:
    """ε̂*(z, γ) = (z − a E[x | z]) / b for x ~ Σ_k π_k N(m_k, diag(v_k)) and z = a x + b ε."""

    def __init__(self, means: torch.Tensor, variances: torch.Tensor, weights: torch.Tensor) -> None:
        self.means, self.variances, self.log_w = means.to(F64), variances.to(F64), weights.to(F64).log()

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        zf = z.reshape(z.shape[0], 1, -1).to(F64)
        g = logsnr.to(F64).reshape(-1, 1, 1)
        a, b2 = torch.sigmoid(g).sqrt(), torch.sigmoid(-g)
        var = a**2 * self.variances + b2  # (B, K, d) marginal variance of z per component
        diff = zf - a * self.means
        log_r = self.log_w - 0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1)
        resp = torch.softmax(log_r, -1).unsqueeze(-1)
        post = self.means + a * self.variances / var * diff
        x_mean = (resp * post).sum(1)
        eps_hat = (zf[:, 0] - a[:, 0] * x_mean) / b2[:, 0].sqrt()
        return eps_hat.reshape(z.shape).to(z.dtype)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Exact −log p(x) of the mixture (continuous components only)."""
        xf = x.reshape(x.shape[0], 1, -1).to(F64)
        comp = -0.5 * ((xf - self.means) ** 2 / self.variances + (2 * math.pi * self.variances).log()).sum(-1)
        return -torch.logsumexp(self.log_w + comp, -1)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n draws from the mixture."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=gen)
        noise = torch.randn(n, self.means.shape[1], generator=gen, dtype=F64)
        return self.means[k] + self.variances[k].sqrt() * noise
