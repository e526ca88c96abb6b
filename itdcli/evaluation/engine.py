"""Runs a denoiser over (image, logSNR, noise) cells and records per-cell ε-unit errors (spec §7 common setup).

Every image draws its own logSNR points, noise and dequantization offsets from a generator seeded by
(run seed, dataset index, round), so results do not depend on batch size, device or `--limit`. One network
forward per cell is shared by the clamped and rounded errors; the dequantized estimator needs a
second forward on x + δ(u − ½). Cells are sorted by logSNR so that each batch runs in one format of the
precision policy; errors stay on the device until a group of images is done (no host sync per batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from itdcli import runtime
from itdcli.core import channel, controls
from itdcli.core.gaussian import GaussianReference
from itdcli.core.kinds import PointScheme, Rounding
from itdcli.core.proposal import Proposal, cdf_points, stratum_groups
from itdcli.data import Dataset
from itdcli.data.dataset import level_values
from itdcli.errors import ItdError
from itdcli.evaluation.cellerrors import CellErrors, Projection, Projections
from itdcli.models.base import Denoiser

F64 = torch.float64
PILOT_STREAM = -1


@dataclass(frozen=True)
class Plan:
    """What to evaluate: points per image, proposal, seed, error kinds, noise draws and how to run the network."""

    proposal: Proposal
    points: int
    scheme: PointScheme
    seed: int
    batch_size: int
    rounding: Rounding = "soft"
    kinds: frozenset[Projection] = frozenset({"model"})  # the model's projections to record
    stream: int = 0
    draws: int = 1
    antithetic: bool = False
    precision: runtime.Precision = field(default_factory=lambda: runtime.Precision("fp32"))
    channels_last: bool = False
    fixed_shape: bool = False  # pad every batch to the batch size (a compiled network then compiles once)

    @property
    def noises(self) -> int:
        """Noise draws evaluated per logSNR point (each draw twice when antithetic)."""
        return self.draws * (2 if self.antithetic else 1)

    @property
    def main(self) -> bool:
        """Whether the network runs on x itself (the clamped and rounded errors)."""
        return bool(self.kinds & {"model", "round"})

    @property
    def deq(self) -> bool:
        """Whether the network runs on the dequantized x + δ(u − ½)."""
        return "deq" in self.kinds


@dataclass
class Curves:
    """Per-point arrays (N, J): logSNR, importance weight, ε-unit error of each candidate; variance groups (J,)."""

    index: Tensor
    logsnr: Tensor
    weight: Tensor
    errors: CellErrors = field(default_factory=CellErrors)
    groups: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def to_arrays(self, prefix: str = "") -> dict[str, Tensor]:
        """The saved form (arrays.safetensors): logsnr, weight, groups and the errors' mse/NAME, under `prefix`."""
        arrays = {f"{prefix}logsnr": self.logsnr, f"{prefix}weight": self.weight, f"{prefix}groups": self.groups}
        arrays.update(self.errors.to_arrays(prefix))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, Tensor], prefix: str = "") -> Curves:
        """The curves a run saved with `to_arrays` (errors in float64), with the run's image index."""
        return cls(
            arrays["index"],
            arrays[f"{prefix}logsnr"].double(),
            arrays[f"{prefix}weight"].double(),
            CellErrors.from_arrays(arrays, prefix),
            arrays[f"{prefix}groups"],
        )

    def subset(self, keep: Callable[[str], bool]) -> Curves:
        """The same points with only the error fields whose name `keep` accepts."""
        return replace(self, errors=self.errors.only(keep))

    def rows(self, rows: Tensor) -> Curves:
        """The curves of the images `rows` only."""
        errors = self.errors.map(lambda t: t[rows])
        return Curves(self.index[rows], self.logsnr[rows], self.weight[rows], errors, self.groups)

    def extended(self, more: Curves) -> Curves:
        """These points followed by another round's for the same images; the new round's groups come after."""
        shift = int(self.groups.max()) + 1 if self.groups.numel() else 0
        return Curves(
            self.index,
            torch.cat([self.logsnr, more.logsnr], 1),
            torch.cat([self.weight, more.weight], 1),
            CellErrors.cat([self.errors, more.errors], 1),
            torch.cat([self.groups, more.groups + shift]),
        )


def _check_shape(eps_hat: Tensor, z: Tensor) -> None:
    """Fail with a one-line error when a denoiser returns the wrong shape."""
    if eps_hat.shape != z.shape:
        raise ItdError(
            f"the model returned shape {tuple(eps_hat.shape)} for input {tuple(z.shape)}: "
            "a denoiser must return eps_hat shaped like z"
        )


def _check_finite(err: Tensor | None, logsnr: Tensor) -> None:
    """Fail with a one-line error when a denoiser returned NaN or inf anywhere in a group (one host sync)."""
    if err is None:
        return
    bad = ~torch.isfinite(err)
    if bool(bad.any()):
        at = ", ".join(f"{g:.3g}" for g in sorted(set(logsnr[bad.cpu()].tolist()))[:3])
        raise ItdError(f"the model returned NaN or inf at logSNR {at}; check the network or narrow the logSNR range")


class _Runner:
    """Calls the network batch by batch in the precision policy's format, halving the batch on out-of-memory."""

    def __init__(
        self, model: Denoiser, plan: Plan, device: torch.device, progress: Callable[[int], None] | None = None
    ) -> None:
        """Start at the plan's batch size; `progress(points)` hears of each batch, in whole points done."""
        self.model, self.plan, self.device, self.batch = model, plan, device, plan.batch_size
        self.progress, self.cells, self.reported = progress, 0, 0
        self.per_point = plan.noises * (int(plan.main) + int(plan.deq))  # forwards per logSNR point

    def _tick(self, cells: int) -> None:
        """Report the points completed so far, batch by batch, so that an ETA shows from the first batch."""
        self.cells += cells
        points = self.cells // self.per_point
        if self.progress is not None and points > self.reported:
            self.progress(points - self.reported)
            self.reported = points

    def residual(self, x: Tensor, eps: Tensor, logsnr: Tensor, modes: list[runtime.Mode]) -> Tensor:
        """u = ε − ε̂ in float64 for cells sorted by format (`modes` per cell, known on the host)."""
        out, start = [], 0
        while start < len(modes):
            stop = min(start + self.batch, len(modes))
            stop = start + next((i for i, m in enumerate(modes[start:stop]) if m != modes[start]), stop - start)
            try:
                out.append(self._call(x[start:stop], eps[start:stop], logsnr[start:stop], modes[start]))
                self._tick(stop - start)
            except (RuntimeError, MemoryError) as exc:
                if not runtime.is_out_of_memory(exc) or self.batch == 1:
                    raise
                runtime.empty_cache(self.device)
                self.batch //= 2
                continue
            start = stop
        return torch.cat(out)

    def _call(self, x: Tensor, eps: Tensor, logsnr: Tensor, mode: runtime.Mode) -> Tensor:
        """One forward in one format; failures other than out-of-memory become one-line errors."""
        z = channel.noisy(x.to(F64), eps.to(F64), logsnr).to(torch.float32)
        if self.plan.channels_last:
            z = runtime.to_channels_last(z)
        n = z.shape[0]
        size = self.batch if self.plan.fixed_shape and n < self.batch else n  # a compiled network sees one shape
        try:
            with runtime.network_mode(mode, self.device):
                eps_hat = self.model(_padded(z, size), _padded(logsnr, size))[:n]
        except (RuntimeError, TypeError, ValueError) as exc:
            if runtime.is_out_of_memory(exc):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ItdError(
                f"the model failed on z {tuple(z.shape)} float32 with logsnr ({z.shape[0]},) float64: "
                f"{type(exc).__name__}: {first}"
            ) from exc
        if not isinstance(eps_hat, Tensor):
            raise ItdError(
                f"the model returned a {type(eps_hat).__module__}.{type(eps_hat).__name__}, not a torch.Tensor: "
                "return eps_hat as a tensor shaped like z (any float dtype or device is accepted)"
            )
        _check_shape(eps_hat, z)
        return eps.to(F64) - eps_hat.to(eps.device, F64)  # float64 or another device: accepted


def _padded(t: Tensor, size: int) -> Tensor:
    """`t` with its last row repeated up to `size` rows."""
    return t if t.shape[0] >= size else torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])])


class _Cells:
    """All cells of a group of images, sorted by logSNR: values, eigen-coordinates, levels, logSNR, noise."""

    def __init__(self, data: Dataset, codes: Tensor, rows: Tensor, plan: Plan, ref: GaussianReference) -> None:
        """Draw every image's points, noise and dequantization offsets from its own generator."""
        logsnr, eps, deq = [], [], []
        shape = (plan.points, plan.draws, *data.shape)
        for i in rows.tolist():
            gen = runtime.generator(plan.seed, i, plan.stream)
            g = plan.proposal.icdf(cdf_points(plan.points, plan.scheme, gen))
            logsnr.append(g.repeat_interleave(plan.noises))
            e = torch.randn(shape, generator=gen)
            eps.append(torch.cat([e, -e], 1) if plan.antithetic else e)
            if plan.deq:
                u = torch.rand(shape, generator=gen)
                deq.append(torch.cat([u, 1 - u], 1) if plan.antithetic else u)
        g = torch.cat(logsnr)
        self.order = g.argsort(stable=True)  # sorted by logSNR: one format per batch
        self.restore = self.order.argsort()
        self.logsnr_host = g[self.order]
        self.modes = [plan.precision.mode(v) for v in self.logsnr_host.tolist()]
        device = codes.device
        order = self.order.to(device)
        per_image = len(g) // len(rows)
        local = torch.arange(len(rows), device=device).repeat_interleave(per_image)[order]
        stored = codes[rows.to(device)]
        values = level_values(stored, data.levels)
        self.x = values[local]
        self.y = ref.whiten(values)[local]  # once per image, not once per cell
        self.k = stored[local] if data.levels else None
        self.logsnr = self.logsnr_host.to(device)
        self.eps = torch.cat(eps).reshape(-1, *data.shape)[self.order].to(device)
        self.deq = torch.cat(deq).reshape(-1, *data.shape)[self.order].to(device) if deq else None


def _errors_for(runner: _Runner, cells: _Cells, data: Dataset, ref: GaussianReference, plan: Plan) -> CellErrors:
    """The candidate errors of every cell of a group (clamped or raw, rounded, Gaussian, dequantized)."""
    x, g, eps = cells.x, cells.logsnr, cells.eps
    levels = data.levels
    eta = eps.reshape(len(g), -1).to(F64) @ ref.eigvecs  # the noise in eigen-coordinates, for the control variates
    out = CellErrors(moments=_moments(cells, levels))
    if plan.main:
        resid = runner.residual(x, eps, g, cells.modes)
        gauss = ref.mmse_pointwise(cells.y, g)
        model = channel.mse_clamped(resid, x, g) if levels else (resid**2).flatten(1).sum(1)
        rounded = None
        if "round" in plan.kinds and levels and cells.k is not None:
            rounder = channel.mse_rounded_soft if plan.rounding == "soft" else channel.mse_rounded_hard
            rounded = rounder(resid, cells.k, g, levels)
        cv = ref.error_draw(cells.y, eta, g) - gauss  # mean zero: a control variate (spec §5)
        out = replace(out, members={"": Projections(model, rounded)}, gauss=gauss, cv=cv)
    if plan.deq and levels and cells.deq is not None:
        half = 1.0 / (levels - 1)
        x_deq = x + 2 * half * (cells.deq - 0.5)
        resid_deq = runner.residual(x_deq, eps, g, cells.modes)
        y_deq = ref.whiten(x_deq)
        gauss_deq = ref.mmse_pointwise(y_deq, g)
        low, high = _bound_pixels(cells, levels)
        deq = channel.mse_clamped(resid_deq, x_deq, g, -1 - half, 1 + half)
        out = replace(
            out,
            members={
                "": replace(out.members[""], deq=deq, deq_cell=channel.mse_cell(resid_deq, eps, x_deq, g, levels))
            },
            gauss_deq=gauss_deq,
            cv_deq=ref.error_draw(y_deq, eta, g) - gauss_deq,
            deq_moments=controls.dequantization_moments(cells.deq, eps, g, 2 * half, low, high),
        )
    return out


def _bound_pixels(cells: _Cells, levels: int | None) -> tuple[Tensor, Tensor]:
    """Masks of the pixels at the lower and upper end of the grid (none for float data)."""
    if cells.k is None or levels is None:
        none = torch.zeros_like(cells.eps, dtype=torch.bool)
        return none, none
    return cells.k == 0, cells.k == levels - 1


def _moments(cells: _Cells, levels: int | None) -> Tensor:
    """The noise draw's mean-zero moments per class of pixel (at the bounds of [−1, 1], inside), (cells, 12)."""
    return controls.noise_moments(cells.eps, *_bound_pixels(cells, levels))


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
    errors = part.errors.map(lambda err: runtime.gather_shards(err, n))
    return Curves(runtime.gather_shards(part.index, n), g, proposal.weight(g), errors, part.groups)


def evaluate(
    model: Denoiser,
    data: Dataset,
    ref: GaussianReference,
    plan: Plan,
    device: torch.device,
    index: Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Curves:
    """Every candidate's per-point error for the images `index` of `data` (default all) under `plan`.

    Under torchrun (joining its process group if need be) each rank evaluates its `local_rows`, and every
    rank returns all rows in `index` order; `progress` counts this rank's points. Errors of the noise
    draws at one point are averaged.
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
    model = runtime.prepare_model(model, device, plan.channels_last, compile=False)
    codes = data.x.to(device)  # the whole dataset on the device, uint8 levels for discrete data
    runner = _Runner(model, plan, device, progress)
    group = max(1, plan.batch_size // (plan.points * plan.noises))
    chunks: list[CellErrors] = []
    logsnr = []
    with torch.inference_mode():  # each forward sets its own format (runtime.network_mode)
        for start in range(0, len(index), group):
            rows = index[start : start + group]
            cells = _Cells(data, codes, rows, plan, ref)
            errors = _errors_for(runner, cells, data, ref, plan)
            own = errors.members[""]
            _check_finite(own.model if own.model is not None else own.deq, cells.logsnr_host)
            chunks.append(errors.map(_per_point(cells.restore.to(device), len(rows), plan)))
            logsnr.append(cells.logsnr_host[cells.restore].reshape(len(rows), plan.points, plan.noises)[..., 0])
    g = torch.cat(logsnr)
    errors = CellErrors.cat(chunks, 0)
    return Curves(index, g, plan.proposal.weight(g), errors, stratum_groups(plan.points, plan.scheme))


def _per_point(restore: Tensor, images: int, plan: Plan) -> Callable[[Tensor], Tensor]:
    """Cells back in image order with the draws at one point averaged: (cells, ...) to (images, J, ...), on the host."""

    def average(err: Tensor) -> Tensor:
        per_cell = err[restore].reshape(images, plan.points, plan.noises, *err.shape[1:])
        return per_cell.mean(2).to("cpu", F64)

    return average


KEPT_COPIES = 3  # a kept per-cell array exists in float64, its scored integrands and the saved float32 form
CELL_TENSORS = 10  # per-cell tensors of one group on the device: x, whitened x, noise, offsets, residuals, errors


@dataclass(frozen=True)
class Footprint:
    """Memory a round needs: host bytes for the per-point arrays it keeps, device bytes for one group's cells."""

    kept: int
    group: int


def footprint(plan: Plan, images: int, dim: int, errors: int) -> Footprint:
    """The memory of one round of `plan` over `images` images, recording `errors` arrays per point (an upper guess)."""
    per_point = (errors + len(controls.NAMES) + 2) * 8 * KEPT_COPIES
    group = min(images, max(1, plan.batch_size // (plan.points * plan.noises)))
    cells = group * plan.points * plan.noises
    return Footprint(images * plan.points * per_point, cells * dim * 8 * CELL_TENSORS)


def evals_per_image(plan: Plan) -> int:
    """Network forwards per image and round: one per point and noise draw and pass (x itself, dequantized x)."""
    return plan.points * plan.noises * (int(plan.main) + int(plan.deq))


def default_batch_size(dim: int, device: torch.device | None = None) -> int:
    """Cells per batch: 4096 on CUDA (halved on out-of-memory); on CPU near 2¹⁵ input values, 16 to 4096.

    CPU batches stay small so that the activations fit in cache: `benchmarks/batch.py` measured the digits
    network 1.5× faster at 512 cells than at 4096 on two CPU cores.
    """
    if device is not None and device.type == "cuda":
        return 4096
    return max(16, min(4096, 1 << (max(1, 2**15 // max(dim, 1)).bit_length() - 1)))
