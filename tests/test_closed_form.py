"""Closed-form ground truths: exact and deliberately wrong denoisers, the closed-form tails, constant pixels.

Every target here comes from mathematics or from code written in this file or in tests/mixtures.py, never from
itdcli's own functions: a uniform law on K grid points has −log P = log K; the dequantized bound of that law,
scored with the exact denoiser of its box mixture, is log K; the exact denoiser of another law Q gives Q's own
−log q(x) at every point (the identities (C1), (C2) and (D) of docs/math.md hold pointwise for the model's law),
so on data from P its estimate is the cross-entropy −mean log q(x) of the scored images.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mixtures import BoxMixtureDenoiser, MixtureDenoiser
from scipy import integrate, special

import itdcli
from itdcli.cli.main import main
from itdcli.core import tails
from itdcli.errors import ItdError

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
QUIET = {"save": False}


def _grid_points(levels: int, d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct points of the grid {0 … L−1}^d, as integer levels (k, d)."""
    while True:
        pts = torch.randint(0, levels, (k, d), generator=gen)
        if torch.unique(pts, dim=0).shape[0] == k:
            return pts


def _to_unit(levels: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Level k ↦ x = 2k/(L−1) − 1."""
    return 2 * levels.to(F64) / (n_levels - 1) - 1


def _uniform_grid_data(
    levels: int, shape: tuple[int, ...], k: int, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n images drawn uniformly from k distinct grid points: (uint8 images (n, *shape), points (k, d))."""
    gen = torch.Generator().manual_seed(seed)
    pts = _grid_points(levels, math.prod(shape), k, gen)
    data = pts[torch.randint(0, k, (n,), generator=gen)].reshape(n, *shape).to(torch.uint8)
    return data, pts


def _point_masses(pts: torch.Tensor, levels: int, weights: torch.Tensor | None = None) -> MixtureDenoiser:
    """The exact posterior-mean denoiser of a discrete law on grid points (zero-variance mixture)."""
    means = _to_unit(pts, levels)
    w = torch.full((pts.shape[0],), 1 / pts.shape[0], dtype=F64) if weights is None else weights
    return MixtureDenoiser(means, torch.zeros_like(means), w)


# 1. Uniform law on K grid points, exact denoiser, default settings: discrete = log K


@pytest.mark.parametrize(
    ("levels", "shape", "k", "n"),
    [
        pytest.param(256, (1, 2, 4), 16, 300, id="L256-d8-K16-reported"),  # was 29 bpd, not log₂16 / 8 = 0.5
        pytest.param(17, (1, 2, 4), 16, 300, id="L17-d8-K16"),
        pytest.param(256, (3, 4, 4), 16, 200, id="L256-d48-K16"),
    ],
)
def test_uniform_grid_law_with_its_exact_denoiser_gives_log_k_at_default_settings(
    levels: int, shape: tuple[int, ...], k: int, n: int
) -> None:
    data, pts = _uniform_grid_data(levels, shape, k, n, seed=levels + len(shape))
    r = itdcli.nll(data, _point_masses(pts, levels), levels=levels, **QUIET)
    e = r.estimates["discrete"]
    d = math.prod(shape)
    assert abs(e.nats - math.log(k)) < 3 * e.stderr_nats, (e.nats, e.stderr_nats, math.log(k))
    exact_bpd = math.log2(k) / d
    assert abs(e.bpd - exact_bpd) < 3 * e.stderr_bpd, (e.bpd, e.stderr_bpd, exact_bpd)


# 2. Dequantized bound of a uniform grid law with the exact denoiser of its box mixture: log K


def _box_model(pts: torch.Tensor, levels: int) -> BoxMixtureDenoiser:
    """x + δ(u − ½) for x uniform on the points is uniform on K disjoint boxes of side δ around them."""
    delta = 2 / (levels - 1)
    centre = _to_unit(pts, levels)
    return BoxMixtureDenoiser(centre - delta / 2, centre + delta / 2, torch.full((pts.shape[0],), 1 / pts.shape[0]))


def test_box_mixture_denoiser_is_the_posterior_mean() -> None:
    """The helper itself against quadrature of the posterior, E[x | z] = ∫ x p(z | x) p(x) dx / p(z), in 1-D."""
    lows = torch.tensor([[-0.6], [0.1], [0.3]], dtype=F64)
    highs = torch.tensor([[-0.2], [0.2], [0.9]], dtype=F64)
    w = torch.tensor([0.5, 0.2, 0.3], dtype=F64)
    model = BoxMixtureDenoiser(lows, highs, w)
    for g in (-6.0, -1.0, 2.0, 6.0, 9.0):
        a, b = math.sqrt(special.expit(g)), math.sqrt(special.expit(-g))
        for x0 in (-0.5, 0.15, 0.25, 0.31):
            z = a * x0 + 0.7 * b
            num = den = 0.0
            for lo, hi, wk in zip(lows.flatten().tolist(), highs.flatten().tolist(), w.tolist(), strict=True):

                def lik(x: float, z: float = z, a: float = a, b: float = b) -> float:
                    return math.exp(-0.5 * ((z - a * x) / b) ** 2)

                mass = integrate.quad(lik, lo, hi, epsabs=0, epsrel=1e-12, points=[z / a] if lo < z / a < hi else None)
                first = integrate.quad(lambda x, f=lik: x * f(x), lo, hi, epsabs=0, epsrel=1e-12)
                num, den = num + wk / (hi - lo) * first[0], den + wk / (hi - lo) * mass[0]
            got = float(model.posterior_mean(torch.tensor([[z]], dtype=F64), torch.tensor([g], dtype=F64)))
            assert got == pytest.approx(num / den, rel=1e-9, abs=1e-12), (g, x0)


@pytest.mark.parametrize(("levels", "n"), [(17, 300), (256, 300)])
def test_dequantized_mass_above_the_default_range_is_never_silent(levels: int, n: int) -> None:
    """Uniform dequantization of isolated levels has a density that jumps at every box edge: the exact model's
    advantage over the identity decoder decays only like e^{−γ/2}, so the default top of the range (set by the
    identity tail) cuts off real mass. The bound stays above log K, and a warning names a share of the cut-off."""
    k = 16
    data, pts = _uniform_grid_data(levels, (1, 2, 4), k, n, seed=20 + levels)
    r = itdcli.nll(data, _box_model(pts, levels), levels=levels, **QUIET)
    e = r.estimates["dequantized"]
    gap = e.nats - math.log(k)
    assert gap > 3 * e.stderr_nats
    predicted = r.missing_above_bpd["dequantized"] * 8 * math.log(2)
    assert 0.25 * gap < predicted, (gap, predicted)
    (line,) = [w for w in r.warnings if w.startswith("dequantized: about")]
    advised = float(line.rsplit("--logsnr-max ", 1)[1].split()[0])
    assert advised > r.proposal.logsnr_max
    followed = itdcli.nll(data, _box_model(pts, levels), levels=levels, logsnr_max=advised, **QUIET)
    assert not [w for w in followed.warnings if w.startswith("dequantized: about")]  # the advice works
    f = followed.estimates["dequantized"]
    assert f.nats - math.log(k) < 3 * math.hypot(f.stderr_nats, 0.5 * f.stderr_nats)  # and reaches log K


def test_dequantized_bound_of_a_uniform_grid_law_is_log_k_on_a_wide_range() -> None:
    """The same identity with the top of the range far above δ's scale, so that nothing is left above it."""
    levels, k = 17, 16
    data, pts = _uniform_grid_data(levels, (1, 2, 4), k, 300, seed=37)
    r = itdcli.nll(data, _box_model(pts, levels), levels=levels, estimator="dequantized", logsnr_max=20.0, **QUIET)
    e = r.estimates["dequantized"]
    assert abs(e.nats - math.log(k)) < 3 * e.stderr_nats, (e.nats, e.stderr_nats, math.log(k))


# 3. Imperfect models: the exact denoiser of Q on data from P reports Q's cross-entropy


def _p_and_q() -> tuple[MixtureDenoiser, MixtureDenoiser]:
    p = MixtureDenoiser(
        torch.tensor([[-0.5, 0.3], [0.4, -0.2], [0.1, 0.6]], dtype=F64),
        torch.tensor([[0.02, 0.05], [0.06, 0.01], [0.03, 0.03]], dtype=F64),
        torch.tensor([0.5, 0.3, 0.2], dtype=F64),
    )
    q = MixtureDenoiser(
        torch.tensor([[-0.4, 0.2], [0.5, -0.1]], dtype=F64),
        torch.tensor([[0.05, 0.08], [0.04, 0.05]], dtype=F64),
        torch.tensor([0.4, 0.6], dtype=F64),
    )
    return p, q


def test_another_laws_exact_denoiser_gives_its_cross_entropy_on_continuous_data() -> None:
    p, q = _p_and_q()
    gen = torch.Generator().manual_seed(11)
    x, train = p.sample(300, gen), p.sample(2000, gen)
    r = itdcli.nll(x.float(), q, reference=train.float(), **QUIET)
    # the float32 images are what was scored
    cross, own = float(q.nll(x.float()).mean()), float(p.nll(x.float()).mean())
    for name in ("continuous", "continuous_pointwise"):
        e = r.estimates[name]
        assert abs(e.nats - cross) < 3 * e.stderr_nats, (name, e.nats, e.stderr_nats, cross)
        assert e.nats - own > 3 * e.stderr_nats, (name, e.nats, e.stderr_nats, own)


def _gaussian_nll(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """−log N(x; mean, cov) per row, by Cholesky (written here, not itd's)."""
    chol = torch.linalg.cholesky(cov)
    white = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False).T
    return 0.5 * (white**2).sum(1) + chol.diagonal().log().sum() + 0.5 * x.shape[1] * math.log(2 * math.pi)


def test_a_gaussian_with_the_wrong_covariance_reports_its_own_value_not_the_fitted_reference() -> None:
    d = 4
    mean = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=F64)
    var = torch.tensor([0.04, 0.1, 0.02, 0.06], dtype=F64)
    gen = torch.Generator().manual_seed(12)
    x = mean + var.sqrt() * torch.randn(300, d, generator=gen, dtype=F64)
    train = mean + var.sqrt() * torch.randn(4000, d, generator=gen, dtype=F64)
    wrong = MixtureDenoiser(mean[None], (var * torch.tensor([4.0, 0.25, 1.0, 2.0], dtype=F64))[None], torch.ones(1))
    r = itdcli.nll(x.float(), wrong, reference=train.float(), **QUIET)
    xs = x.float().to(F64)
    cross = float(wrong.nll(xs).mean())
    centred = train.float().to(F64)
    fitted = float(_gaussian_nll(xs, centred.mean(0), torch.cov(centred.T)).mean())
    assert cross - fitted > 0.5  # the two values are far apart, so the test tells them apart
    for name in ("continuous", "continuous_pointwise"):
        e = r.estimates[name]
        assert abs(e.nats - cross) < 3 * e.stderr_nats, (name, e.nats, e.stderr_nats, cross, fitted)
        assert e.nats - fitted > 3 * e.stderr_nats, (name, e.nats, e.stderr_nats, fitted)
    worse = [n for n in r.notes if "worse" in n and "N(μ,Σ)" in n]
    assert worse, r.notes


@pytest.mark.parametrize("far", [True, False])
def test_another_discrete_laws_exact_denoiser_is_bounded_by_its_cross_entropy(far: bool) -> None:
    """P uniform on 4 grid points; Q puts other weights on those and on 4 more. log K ≤ estimate ≤ E_P[−log Q].

    With the points far apart on a fine grid, rounding Q's posterior mean cannot beat it, so the estimate is the
    cross-entropy itself; with neighbouring points on a coarse grid only the bounds hold.
    """
    gen = torch.Generator().manual_seed(13 + far)
    if far:
        levels, shape = 256, (1, 2, 4)
        pts = _grid_points(levels, 8, 8, gen)
    else:
        levels, shape = 5, (1, 1, 2)
        pts = torch.tensor([[1, 1], [1, 2], [2, 1], [2, 2], [0, 1], [1, 3], [3, 3], [2, 0]])
    q_w = torch.tensor([0.3, 0.1, 0.05, 0.05, 0.2, 0.1, 0.1, 0.1], dtype=F64)
    data = pts[:4][torch.randint(0, 4, (300,), generator=gen)].reshape(300, *shape).to(torch.uint8)
    r = itdcli.nll(data, _point_masses(pts, levels, q_w), levels=levels, estimator="discrete", **QUIET)
    e = r.estimates["discrete"]
    counts = torch.bincount((data.reshape(300, 1, -1).long() == pts[:4]).all(-1).long().argmax(1), minlength=4).to(F64)
    cross = float(-(counts * q_w[:4].log()).sum() / 300)
    assert cross - math.log(4) > 0.5
    assert e.nats <= cross + 3 * e.stderr_nats, (e.nats, e.stderr_nats, cross)
    assert e.nats >= math.log(4) - 3 * e.stderr_nats, (e.nats, e.stderr_nats)
    if far:
        assert abs(e.nats - cross) < 3 * e.stderr_nats, (e.nats, e.stderr_nats, cross)


# 4. The closed-form tails against quadrature


def _rounding_integrand(g: float, k: int, levels: int) -> float:
    """e^γ δ² E[j²], j = clip(round(e^{−γ/2}ε/δ), −k, L−1−k), P(j) from normal CDF differences."""
    delta = 2 / (levels - 1)
    s = math.exp(-g / 2) / delta  # e^{−γ/2}ε/δ ~ N(0, s²)
    j = np.arange(-k, levels - k)
    lo = np.where(j == -k, -np.inf, (j - 0.5) / s)
    hi = np.where(j == levels - 1 - k, np.inf, (j + 0.5) / s)
    p = np.where(lo > 0, special.ndtr(-lo) - special.ndtr(-hi), special.ndtr(hi) - special.ndtr(lo))
    return math.exp(g) * delta**2 * float((j.astype(float) ** 2 * p).sum())


def _rounding_quad(logsnr_max: float, k: int, levels: int) -> float:
    delta = 2 / (levels - 1)
    top = max(logsnr_max, 2 * math.log(40 / delta)) + 1  # above it e^γδ²/8 > 200: P(j ≠ 0) < e^{−200}
    val, _ = integrate.quad(_rounding_integrand, logsnr_max, top, args=(k, levels), epsabs=0, epsrel=1e-10, limit=500)
    return 0.5 * val


@pytest.mark.parametrize(("levels", "logsnr_max"), [(2, -3.0), (2, 2.0), (17, 0.0), (17, 6.0), (256, 8.0), (256, 13.0)])
def test_rounding_tail_matches_quadrature_for_pixels_anywhere_on_the_grid(levels: int, logsnr_max: float) -> None:
    ks = sorted({0, 1, levels // 3, levels // 2, levels - 2, levels - 1})
    per_pixel = {k: _rounding_quad(logsnr_max, k, levels) for k in ks}
    images = torch.tensor([ks, ks[::-1], [ks[0]] * len(ks), [ks[len(ks) // 2]] * len(ks)])
    codes = images.reshape(4, 1, 1, len(ks))
    expected = torch.tensor([sum(per_pixel[int(k)] for k in row) for row in images], dtype=F64)
    torch.testing.assert_close(tails.rounding_tail(logsnr_max, codes, levels), expected, rtol=1e-6, atol=0)
    mid = max(per_pixel.values())
    assert tails.rounding_tail_bound(logsnr_max, 3, levels) == pytest.approx(3 * mid, rel=1e-6)


def _gaussian_pointwise(g: float, y2: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Σ_i (e^γ y_i² + r_i²)/(1 + r_i)², r_i = e^γ λ_i (math.md §5), per image.

    Written with t = 1/(1 + r) = σ(−γ − log λ), which stays finite at any γ: e^γ/(1 + r)² = t(1 − t)/λ.
    """
    t = special.expit(-g - np.log(lam))
    return (y2 * t * (1 - t) / lam + (1 - t) ** 2).sum(-1)


def _gaussian_pointwise_minus_d(g: float, y2: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The same minus d, without the cancellation of (1 − t)² − 1 at high γ."""
    t = special.expit(-g - np.log(lam))
    return (y2 * t * (1 - t) / lam - 2 * t + t**2).sum(-1)


def _spectrum() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    lam = np.exp(np.linspace(-6.0, 0.5, 5))
    y = rng.standard_normal((3, 5)) * np.sqrt(lam) * np.array([[1.0], [3.0], [0.2]])
    return lam, y


@pytest.mark.parametrize("logsnr_max", [-2.0, 4.0, 11.0])
def test_identity_tail_pointwise_matches_quadrature(logsnr_max: float) -> None:
    """−½∫_{γ_R}^∞ (mmse_G(x, γ) − d) dγ: form (C2) with the identity decoder x̂ = z/a (error d) above γ_R."""
    lam, y = _spectrum()
    expected = []
    for row in y**2:
        val, _ = integrate.quad(
            lambda g, row=row: float(_gaussian_pointwise_minus_d(g, row, lam)),
            logsnr_max,
            np.inf,
            epsabs=0,
            epsrel=1e-10,
            limit=500,
        )
        expected.append(-0.5 * val)
    got = tails.identity_tail_pointwise(logsnr_max, torch.tensor(y), torch.tensor(lam))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-6, atol=1e-12)
    # its mean over y ~ N(0, λ) is the expected identity tail −½∫ (Σ σ(γ + log λ) − d) dγ
    val, _ = integrate.quad(
        lambda g: float(-special.expit(-g - np.log(lam)).sum()), logsnr_max, np.inf, epsabs=0, epsrel=1e-10
    )
    assert tails.identity_tail(logsnr_max, torch.tensor(np.log(lam))) == pytest.approx(-0.5 * val, rel=1e-6)


@pytest.mark.parametrize("logsnr_min", [-8.0, -1.0, 3.0])
def test_left_tails_match_quadrature(logsnr_min: float) -> None:
    """Form (C1) with the linear denoiser below γ_L: ½∫_{−∞}^{γ_L} (mmse_G(x, γ) − mmse_G(γ)) dγ, y² → E y²."""
    lam, y = _spectrum()
    second = y**2 + np.array([[0.0], [0.01], [0.3]])  # any second moment, e.g. averaged over dequantization
    expected, plain = [], []
    for row in second:

        def gap(g: float, row: np.ndarray = row) -> float:
            return float(_gaussian_pointwise(g, row, lam) - special.expit(g + np.log(lam)).sum())

        expected.append(0.5 * integrate.quad(gap, -np.inf, logsnr_min, epsabs=0, epsrel=1e-10, limit=500)[0])

        def own(g: float, row: np.ndarray = row) -> float:
            return float(_gaussian_pointwise(g, row, lam))

        plain.append(0.5 * integrate.quad(own, -np.inf, logsnr_min, epsabs=0, epsrel=1e-10, limit=500)[0])
    got = tails.left_tail_c1(logsnr_min, torch.tensor(second), torch.tensor(lam))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-6, atol=1e-12)
    total = (
        0.5
        * integrate.quad(
            lambda g: float(special.expit(g + np.log(lam)).sum()), -np.inf, logsnr_min, epsabs=0, epsrel=1e-10
        )[0]
    )
    assert tails.gaussian_left_tail(logsnr_min, torch.tensor(np.log(lam))) == pytest.approx(total, rel=1e-6)
    # the discrete form's left tail is the Gaussian's pointwise error itself (through GaussianReference.left_tail)
    ref = itdcli.GaussianReference(torch.zeros(lam.size, dtype=F64), torch.eye(lam.size, dtype=F64), torch.tensor(lam))
    torch.testing.assert_close(
        ref.left_tail(logsnr_min, torch.tensor(second).sqrt()), torch.tensor(plain, dtype=F64), rtol=1e-6, atol=1e-12
    )


# 5. Constant pixels in float data: an error naming the pixel, in the API and on the command line


def _with_constant_pixel(n: int = 50) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.uniform(-0.9, 0.9, size=(n, 1, 2, 4)).astype(np.float32)
    x[:, 0, 1, 3] = 0.25
    return x


PIXEL = re.compile(r"\(?\s*0\s*,\s*1\s*,\s*3\s*\)?")


def test_constant_float_pixel_is_an_error_naming_the_pixel() -> None:
    x = torch.from_numpy(_with_constant_pixel())
    with pytest.raises(ItdError) as info:
        itdcli.nll(x, "gaussian", reference=torch.from_numpy(_with_constant_pixel(80) * 0.5), points=4, **QUIET)
    assert PIXEL.search(str(info.value)), str(info.value)


def test_constant_float_pixel_on_the_command_line_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "constant.npz"
    np.savez(path, x=_with_constant_pixel())
    with pytest.raises(SystemExit) as info:
        main(["nll", str(path), "--points", "4", "--reference", str(path)])
    assert info.value.code == 2
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert PIXEL.search(lines[0]), lines[0]
