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


def test_truncated_normal_mean_matches_scipy_in_both_tails_and_on_narrow_intervals() -> None:
    from scipy.stats import truncnorm

    low = torch.tensor([-1.0, -40.0, 30.0, -0.01, 5.0, -8.0, -3.0, 2.0, -0.5], dtype=torch.float64)
    high = torch.tensor([1.0, -39.5, 30.2, 0.02, 5.001, 9.0, -2.9999, 40.0, 0.5], dtype=torch.float64)
    got = channel.truncated_normal_mean(low, high)
    want = torch.tensor([truncnorm.mean(a, b) for a, b in zip(low.tolist(), high.tolist(), strict=True)])
    assert torch.allclose(got, want.to(torch.float64), rtol=1e-9, atol=1e-12)


def test_cell_posterior_error_matches_a_brute_force_posterior_mean() -> None:
    """E[x | z] for x uniform on the cell of x̂'s nearest level, by quadrature over the cell, against mse_cell."""
    import math

    levels, delta = 17, 2 / 16
    gen = torch.Generator().manual_seed(3)
    k = torch.randint(0, levels, (40, 1), generator=gen)
    x = -1 + k * delta + delta * (torch.rand((40, 1), generator=gen, dtype=torch.float64) - 0.5)  # dequantized
    eps = torch.randn((40, 1), generator=gen, dtype=torch.float64)
    g = torch.linspace(-2.0, 12.0, 40, dtype=torch.float64)
    guess = torch.randint(-1, 2, (40, 1), generator=gen)  # the model's x̂ lands in the true cell or a neighbour
    x_hat = (-1 + (k + guess).clamp(0, levels - 1) * delta) + 0.3 * delta * torch.randn((40, 1), generator=gen)
    resid = torch.exp(g / 2)[:, None] * (x_hat - x)  # u = ε − ε̂ = e^{γ/2}(x̂ − x)
    got = channel.mse_cell(resid, eps, x, g, levels)
    for i in range(40):
        c = -1 + round((float(x_hat[i, 0]) + 1) / delta) * delta
        c = min(max(c, -1.0), 1.0)
        grid = torch.linspace(c - delta / 2, c + delta / 2, 200_001, dtype=torch.float64)
        obs = float(x[i, 0]) + math.exp(-float(g[i]) / 2) * float(eps[i, 0])  # z/a
        logw = -0.5 * math.exp(float(g[i])) * (grid - obs) ** 2
        w = torch.exp(logw - logw.max())
        mean = float((w * grid).sum() / w.sum())
        want = math.exp(float(g[i])) * (mean - float(x[i, 0])) ** 2
        assert abs(float(got[i]) - want) <= 1e-4 * max(1.0, want), (i, float(got[i]), want)
