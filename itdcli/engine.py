"""Runs a denoiser over (image, logSNR, noise) cells and records per-cell ε-unit errors (spec §7 common setup).

Every image draws its own logSNR points, noise and dequantization offsets from a generator seeded by
(run seed, dataset index), so results do not depend on batch size, device or `--limit`. One network
forward per cell is shared by the clamped and rounded errors; the dequantized estimator needs a
second forward on x + δ(u − ½).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from itdcli import runtime
from itdcli.core import channel
from itdcli.core.gaussian import GaussianReference
from itdcli.core.proposal import PointScheme, Proposal, cdf_points
from itdcli.data import Dataset
from itdcli.errors import ItdError
from itdcli.models.base import Denoiser

F64 = torch.float64
Rounding = Literal["soft", "hard"]


@dataclass(frozen=True)
class Plan:
    """What to evaluate: the points per image, the proposal, the seed and which error kinds."""

    proposal: Proposal
    points: int
    scheme: PointScheme
    seed: int
    batch_size: int
    rounding: Rounding = "soft"
    want_round: bool = False
    want_deq: bool = False


@dataclass
class Curves:
    """Per-cell arrays (N, J): logSNR, importance weight, and the ε-unit error of each candidate denoiser."""

    index: Tensor
    logsnr: Tensor
    weight: Tensor
    errors: dict[str, Tensor] = field(default_factory=dict)


def _check_output(eps_hat: Tensor, z: Tensor, logsnr: Tensor) -> None:
    """Fail with a one-line error when a denoiser returns the wrong shape or non-finite values."""
    if eps_hat.shape != z.shape:
        raise ItdError(
            f"the model returned shape {tuple(eps_hat.shape)} for input {tuple(z.shape)}: "
            "a denoiser must return eps_hat shaped like z"
        )
    bad = ~torch.isfinite(eps_hat.flatten(1)).all(1)
    if bool(bad.any()):
        at = ", ".join(f"{g:.3g}" for g in sorted(set(logsnr[bad].tolist()))[:3])
        raise ItdError(f"the model returned NaN or inf at logSNR {at}; check the network or narrow the logSNR range")


def _forward(model: Denoiser, x: Tensor, eps: Tensor, logsnr: Tensor) -> Tensor:
    """Residual u = ε − ε̂ in float64 for one batch, with the network run in float32."""
    z = channel.noisy(x.to(F64), eps.to(F64), logsnr).to(torch.float32)
    try:
        eps_hat = model(z, logsnr)
    except (RuntimeError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ItdError(
            f"the model failed on z {tuple(z.shape)} float32 with logsnr ({z.shape[0]},) float64: "
            f"{type(exc).__name__}: {first}"
        ) from exc
    _check_output(eps_hat, z, logsnr)
    return eps.to(F64) - eps_hat.to(F64)


class _Cells:
    """All cells of a group of images, image-major: level indices, values, eigen-coordinates, logSNR, noise."""

    def __init__(self, data: Dataset, rows: Tensor, plan: Plan, ref: GaussianReference, device: torch.device) -> None:
        """Draw every image's points, noise and dequantization offsets from its own generator."""
        logsnr, eps, deq = [], [], []
        for i in rows.tolist():
            gen = runtime.generator(plan.seed, i)
            logsnr.append(plan.proposal.icdf(cdf_points(plan.points, plan.scheme, gen)))
            eps.append(torch.randn((plan.points, *data.shape), generator=gen))
            if plan.want_deq:
                deq.append(torch.rand((plan.points, *data.shape), generator=gen))
        values = data.values(rows).to(device)
        self.x = values.repeat_interleave(plan.points, 0)
        self.y = ref.whiten(values).repeat_interleave(plan.points, 0)  # once per image, not once per cell
        self.k = data.x[rows].repeat_interleave(plan.points, 0).to(device) if data.levels else None
        self.logsnr = torch.cat(logsnr).to(device)
        self.eps = torch.cat(eps).to(device)
        self.deq = torch.cat(deq).to(device) if deq else None


def _errors_for(
    model: Denoiser, cells: _Cells, sl: slice, data: Dataset, ref: GaussianReference, plan: Plan
) -> dict[str, Tensor]:
    """The candidate errors of one batch of cells (clamped or raw, rounded, Gaussian, dequantized)."""
    x, g, eps = cells.x[sl], cells.logsnr[sl], cells.eps[sl]
    resid = _forward(model, x, eps, g)
    levels = data.levels
    out = {"gauss": ref.mmse_pointwise(cells.y[sl], g)}
    out["model"] = channel.mse_clamped(resid, x, g) if levels else (resid**2).flatten(1).sum(1)
    if plan.want_round and levels and cells.k is not None:
        rounder = channel.mse_rounded_soft if plan.rounding == "soft" else channel.mse_rounded_hard
        out["round"] = rounder(resid, cells.k[sl], g, levels)
    if plan.want_deq and levels and cells.deq is not None:
        half = 1.0 / (levels - 1)
        x_deq = x + 2 * half * (cells.deq[sl] - 0.5)
        resid_deq = _forward(model, x_deq, eps, g)
        out["deq"] = channel.mse_clamped(resid_deq, x_deq, g, -1 - half, 1 + half)
        out["gauss_deq"] = ref.mmse_pointwise(ref.whiten(x_deq), g)
    return out


def _sharded(index: Tensor) -> bool:
    """Whether the ranks split `index`: under torchrun with at least one image per rank."""
    return 1 < runtime.world_size() <= len(index)


def local_rows(index: Tensor) -> Tensor:
    """The images of `index` this rank evaluates: its shard under torchrun, all of them when there are too few."""
    return runtime.shard(index) if _sharded(index) else index


def _gather(part: Curves, index: Tensor, proposal: Proposal) -> Curves:
    """Every rank's shard of the curves, reassembled on every rank in the order of `index`."""
    if not _sharded(index):
        return part
    n = len(index)
    g = runtime.gather_shards(part.logsnr, n)
    errors = {name: runtime.gather_shards(err, n) for name, err in part.errors.items()}
    return Curves(runtime.gather_shards(part.index, n), g, proposal.weight(g), errors)


def evaluate(
    model: Denoiser,
    data: Dataset,
    ref: GaussianReference,
    plan: Plan,
    device: torch.device,
    index: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Curves:
    """Every candidate's per-cell error for the images `index` of `data` (default all) under `plan`.

    Under torchrun (joining its process group if need be) each rank evaluates its `local_rows`, and every
    rank returns all rows in `index` order; `progress` counts this rank's cells.
    """
    index = torch.arange(len(data)) if index is None else index
    runtime.init_distributed(device)
    part = _evaluate(model, data, ref, plan, device, local_rows(index), progress)
    return _gather(part, index, plan.proposal)


def _evaluate(
    model: Denoiser,
    data: Dataset,
    ref: GaussianReference,
    plan: Plan,
    device: torch.device,
    index: Tensor,
    progress: Callable[[int], None] | None,
) -> Curves:
    """The curves of the images `index`, evaluated in this process alone."""
    ref = GaussianReference(ref.mean.to(device), ref.eigvecs.to(device), ref.eigvals.to(device))
    if isinstance(model, torch.nn.Module):
        model.to(device)
    group = max(1, plan.batch_size // plan.points)
    chunks: dict[str, list[Tensor]] = {}
    logsnr = []
    with runtime.exact_float32():
        for start in range(0, len(index), group):
            cells = _Cells(data, index[start : start + group], plan, ref, device)
            logsnr.append(cells.logsnr.cpu())
            for b in range(0, cells.logsnr.numel(), plan.batch_size):
                sl = slice(b, b + plan.batch_size)
                for name, err in _errors_for(model, cells, sl, data, ref, plan).items():
                    chunks.setdefault(name, []).append(err.to("cpu", F64))
                if progress is not None:
                    progress(min(plan.batch_size, cells.logsnr.numel() - b))
    shape = (len(index), plan.points)
    g = torch.cat(logsnr).reshape(shape)
    errors = {name: torch.cat(parts).reshape(shape) for name, parts in chunks.items()}
    return Curves(index, g, plan.proposal.weight(g), errors)


def evals_per_image(plan: Plan) -> int:
    """Network forwards per image: one per point, two when the dequantized estimator is on."""
    return plan.points * (2 if plan.want_deq else 1)


def default_batch_size(dim: int) -> int:
    """A power of two near 2²⁰ values per batch, between 64 and 4096 cells."""
    return max(64, min(4096, 1 << (max(1, 2**20 // max(dim, 1)).bit_length() - 1)))
