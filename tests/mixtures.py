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


def _log_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi, both normal CDFs taken in their lower tails (no cancellation near 1)."""
    upper = lo > 0  # Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi): move both ends to the lower tail
    lo, hi = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
    big, small = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return big + torch.log(-torch.expm1(small - big))


class BoxMixtureDenoiser:
    """ε̂*(z, γ) = (z − a E[x | z]) / b for x uniform on a mixture of boxes Π_i [lo_ki, hi_ki] with weights π_k.

    Given z = a x + b ε and component k, each coordinate's posterior is N(z_i/a, (b/a)²) truncated to
    [lo_ki, hi_ki], and p(z | k) ∝ Π_i (Φ(β_i) − Φ(α_i)) / (hi_ki − lo_ki) with α, β the standardised ends.
    """

    def __init__(self, lows: torch.Tensor, highs: torch.Tensor, weights: torch.Tensor) -> None:
        self.lows, self.highs, self.log_w = lows.to(F64), highs.to(F64), weights.to(F64).log()
        if not bool((self.highs > self.lows).all()):
            raise ValueError("every box needs hi > lo")

    def posterior_mean(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        """E[x | z] at logSNR γ, (B, d) in float64."""
        zf = z.reshape(z.shape[0], 1, -1).to(F64)
        g = logsnr.to(F64).reshape(-1, 1, 1)
        a, b = torch.sigmoid(g).sqrt(), torch.sigmoid(-g).sqrt()
        centre, s = zf / a, b / a  # the posterior before truncation: N(z/a, (b/a)²)
        alpha, beta = (self.lows - centre) / s, (self.highs - centre) / s  # (B, K, d)
        log_z = _log_mass(alpha, beta)
        log_r = self.log_w + (log_z - (self.highs - self.lows).log()).sum(-1)
        resp = torch.softmax(log_r, -1).unsqueeze(-1)
        half_log_2pi = 0.5 * math.log(2 * math.pi)
        # truncated-normal mean: centre + s (φ(α) − φ(β)) / (Φ(β) − Φ(α)), each ratio formed in log space
        ratio = torch.exp(-0.5 * alpha**2 - half_log_2pi - log_z) - torch.exp(-0.5 * beta**2 - half_log_2pi - log_z)
        post = (centre + s * ratio).clamp(self.lows, self.highs)
        return (resp * post).sum(1)

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        g = logsnr.to(F64).reshape(-1, 1)
        a, b = torch.sigmoid(g).sqrt(), torch.sigmoid(-g).sqrt()
        zf = z.reshape(z.shape[0], -1).to(F64)
        eps_hat = (zf - a * self.posterior_mean(z, logsnr)) / b
        return eps_hat.reshape(z.shape).to(z.dtype)

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Exact −log p(x) of the box mixture (+inf outside every box)."""
        xf = x.reshape(x.shape[0], 1, -1).to(F64)
        inside = ((xf >= self.lows) & (xf <= self.highs)).all(-1)
        log_density = self.log_w - (self.highs - self.lows).log().sum(-1)
        return -torch.logsumexp(torch.where(inside, log_density, -math.inf), -1)
