"""Per-image Monte Carlo errors as intervals with their degrees of freedom (Welch–Satterthwaite)."""

import math

import torch
from mixtures import MixtureDenoiser
from scipy import stats

import itdcli

F64 = torch.float64


def _grid_law(levels: int, d: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, MixtureDenoiser]:
    """n images drawn uniformly from k random points of the grid, with the law's exact denoiser."""
    gen = torch.Generator().manual_seed(seed)
    points = torch.randint(0, levels, (k, d), generator=gen)
    data = points[torch.randint(0, k, (n,), generator=gen)].reshape(n, 1, 2, d // 2).to(torch.uint8)
    means = 2 * points.to(F64) / (levels - 1) - 1
    return data, MixtureDenoiser(means, torch.zeros_like(means), torch.full((k,), 1 / k))


def test_t_intervals_with_the_saved_degrees_of_freedom_cover_each_images_exact_value() -> None:
    """Every image of a uniform law on K grid points has −log P = log K. Its integrand sits in the few strata
    where the points separate, so se/NAME alone gives heavy-tailed z-scores; ± t_{0.975, df}·se covers 95%."""
    data, model = _grid_law(17, 4, 4, 200, seed=0)
    exact = math.log2(4) / 4
    covered, wide, total = 0, 0, 0
    for seed in range(4):
        r = itdcli.nll(data, model, levels=17, estimator="discrete", points=16, seed=seed, save=False)
        bpd, se, df = (r.arrays[f"{k}/discrete"] for k in ("bpd", "se", "df"))
        z = ((bpd - exact) / se).abs()
        covered += int((z <= torch.from_numpy(stats.t.ppf(0.975, df.numpy()))).sum())
        wide += int((z > 2).sum())
        total += len(z)
    assert 0.92 <= covered / total <= 0.995, covered / total
    assert wide / total > 0.06  # the plain ±2·se would not have covered as well: the df matter here
