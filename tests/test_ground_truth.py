"""Acceptance ground truths: the estimators against closed-form likelihoods (issue #2, tests 1–4)."""

import math

import torch
from mixtures import MixtureDenoiser

import itdcli
from itdcli.core.gaussian import GaussianReference
from itdcli.models.gaussian import GaussianDenoiser

F64 = torch.float64
WIDE = {"logsnr_min": -15.0, "logsnr_max": 25.0, "loc": 4.0, "scale": 4.0, "save": False}


def _gaussian(d: int = 4, seed: int = 0) -> GaussianReference:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return GaussianReference(torch.randn(d, generator=g, dtype=F64), q, torch.exp(torch.linspace(-4, 1, d, dtype=F64)))


def _samples(true: GaussianReference, n: int, seed: int) -> torch.Tensor:
    """n draws from N(μ, U diag(λ) Uᵀ)."""
    white = torch.randn(n, true.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return true.mean + (white * true.eigvals.sqrt()) @ true.eigvecs.T


def _within(values: torch.Tensor, target: torch.Tensor | float, k: float = 3.0) -> tuple[bool, float, float]:
    diff = values - target
    se = float(diff.std()) / math.sqrt(diff.numel())
    return abs(float(diff.mean())) < k * se, float(diff.mean()), se


def _per_image_nats(result: itdcli.NllResult, name: str, d: int) -> torch.Tensor:
    return result.arrays[f"bpd/{name}"] * d * math.log(2)


def test_gaussian_data_with_its_optimal_denoiser_gives_the_exact_nll() -> None:
    true = _gaussian()
    x = _samples(true, 300, seed=1)
    exact = true.nll(x)
    for reference in (true, "standard-normal"):
        r = itdcli.nll(x.float(), GaussianDenoiser(true), reference=reference, points=256, **WIDE)
        for name in ("continuous", "continuous_pointwise"):
            e = r.estimates[name]
            assert abs(e.nats - float(exact.mean())) < 3 * e.stderr_nats, (reference, name)
            ok, mean, se = _within(_per_image_nats(r, name, 4), exact)
            assert ok, (reference, name, mean, se)


class _Shrunk(GaussianDenoiser):
    """The optimal denoiser with ε̂ scaled by 0.8: strictly worse at every logSNR."""

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return 0.8 * super().forward(z, logsnr)


def test_a_worse_denoiser_is_detected_as_an_upper_bound_above_the_exact_nll() -> None:
    """The same check fails for a suboptimal model: its estimate lies above −log N by more than 3 SE."""
    true = _gaussian()
    x = _samples(true, 300, seed=1)
    r = itdcli.nll(x.float(), _Shrunk(true), reference="standard-normal", points=256, **WIDE)
    ok, mean, se = _within(_per_image_nats(r, "continuous_pointwise", 4), true.nll(x))
    assert not ok and mean > 3 * se


def test_mse_curve_of_the_optimal_denoiser_matches_the_closed_form() -> None:
    true = _gaussian()
    x = _samples(true, 400, seed=2)
    r = itdcli.nll(x.float(), GaussianDenoiser(true), reference=true, points=16, **WIDE)
    errs = r.arrays["mse/model"]
    closed = true.mmse_pointwise(true.whiten(x)[:, None, :], r.arrays["logsnr"])
    ok, mean, se = _within(errs.flatten().to(F64), closed.flatten())
    assert ok, (mean, se)
    exp_closed = true.mmse(r.arrays["logsnr"])
    assert float((errs - exp_closed).mean().abs()) < 4 * float((errs - exp_closed).std()) / math.sqrt(errs.numel())


def test_uniform_law_on_grid_points_gives_log_k_with_the_discrete_estimator() -> None:
    levels, d, k_points = 17, 2, 5
    gen = torch.Generator().manual_seed(3)
    support = torch.randperm(levels**d, generator=gen)[:k_points]
    grid = torch.stack([support // levels, support % levels], 1)
    data = grid[torch.randint(0, k_points, (400,), generator=gen)].to(torch.uint8)
    means = 2 * grid.to(F64) / (levels - 1) - 1
    model = MixtureDenoiser(means, torch.zeros_like(means), torch.full((k_points,), 1 / k_points))
    opts = {**WIDE, "logsnr_min": -12.0, "logsnr_max": 16.0}
    r = itdcli.nll(data, model, levels=levels, estimator="discrete", points=64, **opts)
    e = r.estimates["discrete"]
    assert abs(e.nats - math.log(k_points)) < 3 * e.stderr_nats, (e.nats, e.stderr_nats)
    assert e.nats > math.log(k_points) - 3 * e.stderr_nats


def test_gaussian_mixture_pointwise_estimate_matches_the_exact_density() -> None:
    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.2]], dtype=F64)
    variances = torch.tensor([[0.05, 0.1], [0.2, 0.02], [0.1, 0.1]], dtype=F64)
    model = MixtureDenoiser(means, variances, torch.tensor([0.5, 0.3, 0.2], dtype=F64))
    gen = torch.Generator().manual_seed(4)
    x, train = model.sample(300, gen), model.sample(2000, gen)
    r = itdcli.nll(x.float(), model, reference=train.float(), points=64, **WIDE)
    ok, mean, se = _within(_per_image_nats(r, "continuous_pointwise", 2), model.nll(x))
    assert ok, (mean, se)


def test_results_do_not_depend_on_batch_size_or_on_the_subset() -> None:
    # no control variate: its slopes are fitted on other images, so per-image values would depend on the subset
    common = {"points": 12, "seed": 5, "save": False, "selection": "none", "control_variate": False}
    small = itdcli.nll("digits_test", "gaussian", batch_size=7, limit=25, **common)
    large = itdcli.nll("digits_test", "gaussian", batch_size=500, limit=25, **common)
    for name in small.estimates:
        torch.testing.assert_close(small.arrays[f"bpd/{name}"], large.arrays[f"bpd/{name}"], rtol=1e-9, atol=1e-9)
    full = itdcli.nll("digits_test", "gaussian", **common)
    rows = small.arrays["index"]
    torch.testing.assert_close(full.arrays["bpd/discrete"][rows], small.arrays["bpd/discrete"], rtol=1e-9, atol=1e-9)
