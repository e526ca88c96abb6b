"""The channel and the residual-form errors against direct float64 computations (spec §3, §11.1)."""

import torch

from itdcli.core import channel

F64 = torch.float64


def _setup(levels: int = 17, n: int = 64, d: int = 30, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Grid data, noise, a noisy estimate, per-sample logSNR spanning low to high."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, levels, (n, d), generator=g)
    x = 2 * k.to(F64) / (levels - 1) - 1
    eps = torch.randn(n, d, generator=g, dtype=F64)
    eps_hat = eps + 0.7 * torch.randn(n, d, generator=g, dtype=F64)
    logsnr = torch.linspace(-6, 12, n, dtype=F64)
    return k, x, eps, eps_hat, logsnr


def test_gains_are_variance_preserving_with_snr_e_gamma() -> None:
    g = torch.linspace(-20, 20, 41, dtype=F64)
    a, b = channel.gains(g)
    torch.testing.assert_close(a**2 + b**2, torch.ones_like(g))
    torch.testing.assert_close((a**2 / b**2).log(), g)


def test_x_hat_inverts_the_channel_with_true_noise() -> None:
    _, x, eps, _, g = _setup()
    z = channel.noisy(x, eps, g)
    torch.testing.assert_close(channel.x_hat(z, eps, g), x)


def test_eps_error_equals_e_gamma_times_x_error() -> None:
    _, x, eps, eps_hat, g = _setup()
    z = channel.noisy(x, eps, g)
    x_err = ((x - channel.x_hat(z, eps_hat, g)) ** 2).sum(1)
    torch.testing.assert_close(channel.mse_eps(eps, eps_hat), torch.exp(g) * x_err)


def test_clamped_residual_form_matches_direct_clamp() -> None:
    _, x, eps, eps_hat, g = _setup()
    z = channel.noisy(x, eps, g)
    direct = torch.exp(g) * ((x - channel.x_hat(z, eps_hat, g).clamp(-1, 1)) ** 2).sum(1)
    torch.testing.assert_close(channel.mse_clamped(eps - eps_hat, x, g), direct)


def test_hard_rounding_matches_direct_rounding() -> None:
    levels = 17
    k, x, eps, eps_hat, g = _setup(levels)
    z = channel.noisy(x, eps, g)
    delta = 2 / (levels - 1)
    xh = (-1 + delta * torch.round((channel.x_hat(z, eps_hat, g) + 1) / delta)).clamp(-1, 1)
    direct = torch.exp(g) * ((x - xh) ** 2).sum(1)
    torch.testing.assert_close(channel.mse_rounded_hard(eps - eps_hat, k, g, levels), direct)


def _soft_round_all_bins(xh: torch.Tensor, g: torch.Tensor, levels: int) -> torch.Tensor:
    """Soft rounding over every bin at once, as the spec writes it (independent implementation)."""
    bins = torch.linspace(-1, 1, levels, dtype=F64)
    logits = -0.5 * (1 + torch.exp(g))[:, None, None] * (xh[..., None] - bins) ** 2
    return (torch.softmax(logits, -1) * bins).sum(-1)


def test_soft_rounding_window_matches_all_bins_from_low_to_high_logsnr() -> None:
    for levels in (17, 256):
        k, x, eps, eps_hat, g = _setup(levels)
        z = channel.noisy(x, eps, g)
        xh = _soft_round_all_bins(channel.x_hat(z, eps_hat, g), g, levels)
        direct = torch.exp(g) * ((x - xh) ** 2).sum(1)
        got = channel.mse_rounded_soft(eps - eps_hat, k, g, levels)
        torch.testing.assert_close(got, direct, rtol=1e-9, atol=1e-9)


def test_soft_window_shrinks_as_logsnr_grows() -> None:
    widths = [channel.soft_window(g, 256) for g in (0.0, 6.0, 10.0, 14.0)]
    assert widths[0] == 255
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] <= 3


def test_residual_forms_stay_accurate_at_high_logsnr() -> None:
    """At γ = 26 the direct float32 path loses percents (spec §11.1); the residual form is exact."""
    g = torch.full((4,), 26.0, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3072, generator=gen, dtype=F64) * 1.8 - 0.9
    u = 0.01 * torch.randn(4, 3072, generator=gen, dtype=F64)
    torch.testing.assert_close(channel.mse_clamped(u, x, g), (u**2).sum(1))
