"""Matplotlib figure of ε-MSE against logSNR for saved runs, with the N(0,I) and N(μ,Σ) references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from itdcli.core.gaussian import mmse_gaussian
from itdcli.evaluation.cellerrors import Projection

CURVE_KINDS: dict[Projection, str] = {
    "model": "",
    "round": " (rounded)",
    "deq": " (dequantized)",
    "deq_cell": " (dequantized, cell posterior)",
}
CLAMPED = " (clamped to [−1, 1])"


@dataclass(frozen=True)
class Series:
    """One line of the figure: x = logSNR, y = ε-MSE per dimension."""

    label: str
    logsnr: Tensor
    mse: Tensor
    style: str = "-"


def run_series(label: str, arrays: dict[str, Tensor], dim: int, discrete: bool) -> list[Series]:
    """Column means over images of each saved error curve of one run, in logSNR order (rounds interleave)."""
    from itdcli.evaluation.engine import Curves

    suffixes = {**CURVE_KINDS, "model": CLAMPED if discrete else ""}
    passes = [Curves.from_arrays(arrays)] if "logsnr" in arrays else []
    passes += [Curves.from_arrays(arrays, "deq/")] if "deq/logsnr" in arrays else []
    series = vlb_series(label, arrays, dim)
    for kind in CURVE_KINDS:
        for c in passes:
            err = c.errors.members[""].get(kind)
            if err is not None:
                x = c.logsnr.mean(0)
                order = x.argsort()
                series.append(Series(label + suffixes[kind], x[order], err.mean(0)[order] / dim))
    return series


def vlb_series(label: str, arrays: dict[str, Tensor], dim: int) -> list[Series]:
    """The variational bound's per-step terms as 2·L_t/Δγ per dimension: on the ε-MSE axis, ½∫ of it is the bound.

    Drawn beside the I-MMSE curves (whose ½∫ is the discrete estimate), it shows where the two bounds differ
    (docs/math.md, Three likelihoods).
    """
    if "vlb/logsnr" not in arrays:
        return []
    g = arrays["vlb/logsnr"].to(torch.float64)
    order = g.argsort()
    per = 2 * arrays["vlb/per_logsnr"].to(torch.float64)[order] / dim
    return [Series(label + " (variational bound, 2·L_t/Δγ)", g[order], per, "-.")]


def reference_series(eigvals: Tensor, lo: float, hi: float) -> list[Series]:
    """mmse_G(γ)/d of N(μ, Σ) and σ(γ) of N(0, I) on a dense grid over [lo, hi] (spec §4)."""
    grid = torch.linspace(lo, hi, 400, dtype=torch.float64)
    return [
        Series("N(μ,Σ) reference", grid, mmse_gaussian(grid, eigvals) / eigvals.numel(), "--"),
        Series("N(0,I) reference", grid, torch.sigmoid(grid), ":"),
    ]


def ensemble_series(arrays: dict[str, Tensor], eigvals: Tensor) -> list[tuple[Series, Series]]:
    """Per estimator kind, the ensemble's chosen-error curve and the N(μ, Σ) curve at the same logSNR (to shade).

    Points are drawn in logSNR order: columns of several rounds interleave.
    """
    x = arrays["ensemble/logsnr"].to(torch.float64).mean(0)
    order = x.argsort()
    x = x[order]
    dim = eigvals.numel()
    ref = Series("", x, mmse_gaussian(x, eigvals) / dim)
    kinds = [k for k in ("continuous", "discrete", "dequantized") if f"ensemble/{k}" in arrays]
    return [
        (Series(f"ensemble ({k})", x, arrays[f"ensemble/{k}"].to(torch.float64).mean(0)[order] / dim, "-"), ref)
        for k in kinds
    ]


FIGURE_MARK = "itd curve"  # in every figure's metadata: --overwrite replaces only files that carry it


def draw(series: list[Series], title: str, path: Path, shade: list[tuple[Series, Series]] | None = None) -> None:
    """Write the figure to `path`; the format follows its suffix (pdf, png, svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5), constrained_layout=True)
    for s in series:
        ax.plot(s.logsnr.numpy(), s.mse.numpy(), s.style, label=s.label, linewidth=1.6)
    for curve, ref in shade or []:
        ax.plot(curve.logsnr.numpy(), curve.mse.numpy(), "k-", label=curve.label, linewidth=2.2)
        ax.fill_between(curve.logsnr.numpy(), curve.mse.numpy(), ref.mse.numpy(), alpha=0.15, label="gap to N(μ,Σ)")
    ax.set_xlabel("logSNR γ")
    ax.set_ylabel("ε-MSE per dimension, E‖ε − ε̂‖² / d")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, format=path.suffix[1:], metadata={"Creator": FIGURE_MARK})
    plt.close(fig)
