"""The two likelihoods that are not I-MMSE integrals, on the same model and images (docs/math.md, Three likelihoods).

`vlb`: the discrete-time variational bound of the model's own schedule (improved-diffusion's `calc_bpd_loop`),
either every step (`full`) or an unbiased stratified sample of steps per image with importance weights from a
pilot, the decoder step t = 0 always evaluated twice. `ode`: the probability-flow ODE's log-density, on
dequantized x + δ(u − ½) for integer data (Score SDE's) or on x itself for float data. Both return per-image
nats with their Monte Carlo variances, so they sit in the same table as the I-MMSE estimators.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from itdcli import runtime
from itdcli.core import ode as flow
from itdcli.core import vlb as bound
from itdcli.core.estimators import Estimate
from itdcli.core.gaussian import GaussianReference
from itdcli.data import Dataset
from itdcli.errors import ItdError
from itdcli.models import base
from itdcli.models.base import Denoiser

F64 = torch.float64
FIRST_STEPS = 32  # timesteps per image in the first round of the stratified bound
PILOT_IMAGES, PILOT_GRID = 16, 64  # the pilot's images and evenly spaced timesteps, for the importance weights
PROPOSAL_FLOOR = 1e-3  # of the largest pilot term: every step keeps some probability
DEQ_DRAWS = 2  # dequantization draws per image for the ODE on integer data (their spread is the error)
VLB_STREAM, ODE_STREAM = 1000, 2000  # generator streams, apart from the I-MMSE passes' rounds
NOISE_STREAMS = 10_000  # the step terms' noise, apart from the streams that draw their timesteps


@dataclass(frozen=True)
class SolverInputs:
    """What a solver estimator reads: network, scored images, range, reference and its own settings."""

    net: Denoiser
    dataset: Dataset
    index: Tensor
    device: torch.device
    ref: GaussianReference
    seed: int
    batch_size: int
    target: float | None  # bpd for the dataset's Monte Carlo standard error
    logsnr_min: float
    logsnr_max: float
    vlb_full: bool = False
    probes: int = 4
    rtol: float = 1e-5
    atol: float = 1e-5
    ode_max_steps: int = 10_000  # accepted solver steps per batch of images before the ODE gives up
    progress: Callable[[int, int], None] | None = None  # (done, total) in the solver's unit, on the main rank


@dataclass
class Solved:
    """Per-image nats and variances, network evaluations per image, seconds, and what the result should record."""

    estimate: Estimate
    evals_per_image: float
    seconds: float
    details: dict[str, str | float | int] = field(default_factory=dict)
    arrays: dict[str, Tensor] = field(default_factory=dict)


def _mean_se_bpd(variance: Tensor, dim: int) -> float:
    """The standard error of the dataset mean, in bits/dim, from per-image variances in nats²: √Σvar / N."""
    return float(variance.sum().sqrt()) / (len(variance) * dim * math.log(2))


def _nats(bpd: Tensor, dim: int) -> Tensor:
    """Bits per dimension to nats per image."""
    return bpd * dim * math.log(2)


class _Steps:
    """Step terms L_t of the variational bound for (image, timestep) cells, in nats, batched through the network."""

    def __init__(self, inp: SolverInputs) -> None:
        """Read the model's schedule (or the documented default) and the scored images."""
        self.inp = inp
        self.time = base.discrete_time(inp.net)
        self.schedule = bound.DiscreteSchedule(self.time.alphas_cumprod.to(F64))
        if inp.dataset.levels is None:
            raise ItdError("the variational bound needs integer data (its decoder is discrete): use --estimator ode")
        self.levels = inp.dataset.levels
        self.x0 = inp.dataset.values(inp.index).to(F64)
        self.evals = self.planned = 0

    def plan(self, evals: int) -> None:
        """Count `evals` more network evaluations into the progress total (a phase about to run)."""
        self.planned += evals

    def terms(self, rows: Tensor, t: Tensor, stream: int) -> Tensor:
        """L_t for image rows (M,) of the scored set at steps t (M,), one noise draw each, seeded per image."""
        noise = torch.empty((len(rows), *self.x0.shape[1:]), dtype=F64)
        for i in torch.unique(rows).tolist():
            at = rows == i
            gen = runtime.generator(self.inp.seed, int(self.inp.index[i]), NOISE_STREAMS + stream)
            noise[at] = torch.randn((int(at.sum()), *self.x0.shape[1:]), generator=gen, dtype=F64)
        out = []
        for start in range(0, len(rows), self.inp.batch_size):
            part = slice(start, start + self.inp.batch_size)
            out.append(self._batch(self.x0[rows[part]], t[part], noise[part]))
        return torch.cat(out) if out else torch.zeros(0, dtype=F64)

    def _batch(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """One network batch: x_t from q(x_t | x_0), the model's mean and variance, the step's term."""
        s, device = self.schedule, self.inp.device
        x_t = bound.q_sample(s, x0, t, noise)
        with torch.inference_mode():
            eps, v = base.outputs(self.inp.net, x_t.to(device, torch.float32), s.logsnr[t].to(device))
        self.evals += len(t)
        if self.inp.progress is not None:
            self.inp.progress(self.evals, max(self.planned, self.evals))
        eps64 = eps.to("cpu", F64)
        if self.time.variance == "learned_range" and v is None:
            raise ItdError("the model declares a learned variance but returned no variance channels")
        v64 = None if self.time.variance != "learned_range" or v is None else v.to("cpu", F64)
        logvar = bound.model_logvar(s, t, self.time.variance, v64, x0)
        return _nats(bound.step_bpd(s, x0, x_t, t, eps64, logvar, self.levels), x0[0].numel())

    def prior(self) -> Tensor:
        """L_T per image, in nats."""
        return _nats(bound.prior_bpd(self.schedule, self.x0), self.x0[0].numel())


def _full_evals(steps: int) -> int:
    """Network evaluations per image of the full loop: the decoder twice, every step once, an unpaired last again."""
    return 2 + (steps - 1) + (steps - 1) % 2


def _pilot_grid(steps: int) -> Tensor:
    """The pilot's evenly spaced timesteps in 1..T−1."""
    grid: Tensor = torch.unique(torch.linspace(1, steps - 1, min(PILOT_GRID, steps - 1)).round().long())
    return grid


def _pilot_evals(steps: int, n: int) -> int:
    """Network evaluations of the stratified bound's pilot (all images together)."""
    return min(PILOT_IMAGES, n) * len(_pilot_grid(steps))


def _decoder(steps: _Steps, n: int) -> tuple[Tensor, Tensor]:
    """The decoder term t = 0 per image from two draws: their mean and the variance of that mean."""
    rows = torch.arange(n).repeat_interleave(2)
    both = steps.terms(rows, torch.zeros(2 * n, dtype=torch.long), VLB_STREAM).reshape(n, 2)
    return both.mean(1), (both[:, 0] - both[:, 1]) ** 2 / 4


def _full(steps: _Steps, n: int) -> tuple[Tensor, Tensor]:
    """Σ_{t≥1} L_t with every step once (calc_bpd_loop); variance from pairs of steps (t, t+1): Σ (L_t − L_{t+1})².

    For two independent draws of equal mean E(a − b)² = Var a + Var b = Var(a + b), so the pairs' squared
    differences add up to the variance of the sum (more where neighbouring steps differ in mean).
    """
    count = steps.schedule.steps - 1
    t = torch.arange(1, count + 1).repeat(n)
    terms = steps.terms(torch.arange(n).repeat_interleave(count), t, VLB_STREAM + 1).reshape(n, count)
    pairs = terms[:, : count - count % 2].reshape(n, -1, 2)
    variance = ((pairs[..., 0] - pairs[..., 1]) ** 2).sum(1)
    if count % 2:  # the last step has no partner: a second draw of it gives Var L_last ≈ (a − a')²/2
        again = steps.terms(torch.arange(n), torch.full((n,), count), VLB_STREAM - 1)
        variance = variance + (terms[:, -1] - again) ** 2 / 2
    return terms.sum(1), variance


def _proposal(steps: _Steps, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Importance weights over t = 1..T−1 ∝ the pilot's root mean square L_t on an even grid, interpolated.

    Returns the proposal (T − 1,), the grid and its mean terms (for the curve of per-step terms).
    """
    T = steps.schedule.steps
    grid = _pilot_grid(T)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 5))[: min(PILOT_IMAGES, n)]
    rows = pick.repeat_interleave(len(grid))
    terms = steps.terms(rows, grid.repeat(len(pick)), VLB_STREAM + 2).reshape(len(pick), len(grid))
    level = terms.pow(2).mean(0).sqrt()  # q_t ∝ √E[L_t²] minimises the variance of Σ_k L_{t_k}/(K q_{t_k})
    everywhere = _interp(torch.arange(1, T).double(), grid.double(), level)
    return everywhere.clamp_min(PROPOSAL_FLOOR * float(level.max()) + 1e-300), grid, terms.mean(0)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, as float64 (numpy's; torch has no interp)."""
    import numpy as np

    return torch.from_numpy(np.interp(x.numpy(), xp.numpy(), fp.numpy())).to(F64)


def _stratified_round(steps: _Steps, proposal: Tensor, count: int, stream: int) -> tuple[Tensor, Tensor]:
    """One round: `count` stratified steps per image from the proposal, the unbiased sum and its variance."""
    n = len(steps.inp.index)
    draws = [
        bound.stratified_timesteps(proposal, count, 1, runtime.generator(steps.inp.seed, int(i), stream))
        for i in steps.inp.index.tolist()
    ]
    draw = bound.TimestepDraw(torch.cat([d.indices for d in draws]), torch.cat([d.weights for d in draws]))
    rows = torch.arange(n).repeat_interleave(count)
    steps.plan(len(rows))
    terms = steps.terms(rows, draw.indices.reshape(-1) + 1, stream).reshape(n, count)
    total, se = bound.stratified_estimate(draw, terms)
    return total, se**2


def _rounds(
    steps: _Steps, proposal: Tensor, target: float | None, dim: int, decoder_var: Tensor
) -> tuple[Tensor, Tensor, int]:
    """Rounds of stratified steps until the dataset's standard error meets `target` bpd (or every step is drawn).

    The error that must meet the target is the whole bound's: the steps' variance plus the decoder's
    `decoder_var` (per image), which more steps cannot lower.
    """
    n, cap = len(steps.inp.index), steps.schedule.steps - 1
    sums, variances, counts, count, stream = [], [], [], FIRST_STEPS, VLB_STREAM + 3
    while True:
        total, var = _stratified_round(steps, proposal, count, stream)
        sums.append(total)
        variances.append(var)
        counts.append(count)
        stream += 1
        k = torch.tensor(counts, dtype=F64)
        mean = sum(c * s for c, s in zip(counts, sums, strict=True)) / k.sum()
        variance = sum(c**2 * v for c, v in zip(counts, variances, strict=True)) / k.sum() ** 2
        se = _mean_se_bpd(variance + decoder_var, dim)
        done = int(k.sum())
        room = (target * n * dim * math.log(2)) ** 2 - float(decoder_var.sum()) if target is not None else 0.0
        if target is None or se <= target or done >= cap or room <= 0:  # room ≤ 0: the decoder alone misses it
            return mean, variance, done
        wanted = math.ceil(done * (float(variance.sum()) / room - 1))
        count = min(max(8, wanted + wanted % 2), cap - done + (cap - done) % 2)


def vlb(inp: SolverInputs) -> Solved:
    """The model's own discrete-time variational bound per image (Ho et al. 2020, eq. 5; docs/math.md)."""
    start = time.perf_counter()
    steps = _Steps(inp)
    n, dim = len(inp.index), inp.dataset.dim
    full = inp.vlb_full or steps.schedule.steps <= FIRST_STEPS + 1
    T = steps.schedule.steps
    steps.plan(n * _full_evals(T) if full else 2 * n + _pilot_evals(T, n))  # the rounds add their own as planned
    first, first_var = _decoder(steps, n)
    details: dict[str, str | float | int] = {"schedule": steps.time.source, "steps": steps.schedule.steps}
    arrays: dict[str, Tensor] = {}
    if full:
        rest, rest_var = _full(steps, n)
        details["method"] = "full loop: every step once (improved-diffusion's calc_bpd_loop)"
    else:
        proposal, grid, profile = _proposal(steps, n, inp.seed)
        pilot = steps.evals
        rest, rest_var, drawn = _rounds(steps, proposal, inp.target, dim, first_var)
        details.update(method="stratified steps, importance weights from a pilot", steps_per_image=drawn)
        decoder_se = _mean_se_bpd(first_var, dim)
        if inp.target is not None and decoder_se > inp.target:
            details["warning"] = (
                f"the decoder term's two draws alone have a standard error of {decoder_se:.4f} bpd, above the target "
                f"{inp.target:g}, which more steps cannot lower: score more images (a larger --limit) or give "
                f"--target-stderr {1.1 * decoder_se:.2g} or more"
            )
        details["pilot_evals"] = pilot
        gamma = steps.schedule.logsnr
        width = (gamma[grid - 1] - gamma[grid]).abs()  # the logSNR interval step t covers
        arrays = {"vlb/logsnr": gamma[grid], "vlb/per_logsnr": profile / width}
    per_image = first + rest + steps.prior()
    return Solved(
        Estimate(per_image, first_var + rest_var), steps.evals / n, time.perf_counter() - start, details, arrays
    )


def _gaussian_prior(ref: GaussianReference, logsnr: float) -> flow.Prior:
    """log N(z; aμ, a²Σ + b²I) at γ_L: the model continued below the range by N(μ,Σ)'s denoiser, as the left tail."""
    a2, b2 = 1 / (1 + math.exp(-logsnr)), 1 / (1 + math.exp(logsnr))

    def log_density(z: Tensor) -> Tensor:
        mean, vecs = ref.mean.to(z.device, F64), ref.eigvecs.to(z.device, F64)
        var = a2 * ref.eigvals.to(z.device, F64) + b2
        y = (z.reshape(z.shape[0], -1) - math.sqrt(a2) * mean) @ vecs
        return -0.5 * ((y**2 / var).sum(1) + torch.log(2 * math.pi * var).sum())

    return log_density


def _exact_trace(inp: SolverInputs) -> bool:
    """Whether the exact divergence (d backward passes) costs no more than the probes (d ≤ probes)."""
    return inp.dataset.dim <= inp.probes


def _flow(inp: SolverInputs, x: Tensor, gen: torch.Generator, prior: flow.Prior) -> flow.FlowLikelihood:
    """One batch's flow log-density; a solver that gives up is reworded with the options that change it."""
    try:
        return flow.flow_log_density(
            inp.net,
            x,
            inp.logsnr_max,
            inp.logsnr_min,
            probes=None if _exact_trace(inp) else inp.probes,
            rtol=inp.rtol,
            atol=inp.atol,
            generator=gen,
            prior=prior,
            max_steps=inp.ode_max_steps,
        )
    except flow.SolverError as err:
        if err.failure is None:
            raise
        raise flow.SolverError(
            f"the probability-flow ODE did not converge ({err.failure}): stopped at logSNR {err.logsnr_reached:.3g} "
            f"of [{inp.logsnr_min:.3g}, {inp.logsnr_max:.3g}]; loosen --rtol/--atol (now {inp.rtol:g}/{inp.atol:g}), "
            f"raise --ode-max-steps (now {inp.ode_max_steps:,}) or narrow --logsnr-min/--logsnr-max",
            err.logsnr_reached,
            err.failure,
        ) from None


def _error_source(draws: int, exact: bool) -> str:
    """What the ODE's reported error measures."""
    if draws > 1:
        return "spread over dequantization draws" + ("" if exact else " (probes included)")
    return "none beyond the solver's tolerance (exact trace)" if exact else "Hutchinson probes"


def ode(inp: SolverInputs) -> Solved:
    """−log p(x) by the probability-flow ODE, on dequantized x with + d log(1/δ) for integer data (Song et al. 2021)."""
    start = time.perf_counter()
    x = inp.dataset.values(inp.index).to(F64)
    levels, dim, n = inp.dataset.levels, inp.dataset.dim, len(inp.index)
    draws = DEQ_DRAWS if levels else 1
    delta = 2.0 / (levels - 1) if levels else 0.0
    prior = _gaussian_prior(inp.ref, inp.logsnr_min)
    values, probe_var, nfe = torch.zeros(n, draws, dtype=F64), torch.zeros(n, draws, dtype=F64), 0
    batch = max(1, min(n, inp.batch_size // max(8, 2 * inp.probes)))
    for d in range(draws):
        for s in range(0, n, batch):
            rows = torch.arange(s, min(n, s + batch))
            gen = runtime.generator(inp.seed, int(inp.index[rows[0]]), ODE_STREAM + d)
            u = torch.rand(x[rows].shape, generator=gen, dtype=F64) if levels else torch.full_like(x[rows], 0.5)
            solved = _flow(inp, (x[rows] + delta * (u - 0.5)).to(inp.device, torch.float32), gen, prior)
            values[rows, d] = -solved.log_density.to("cpu", F64) + (dim * math.log(1 / delta) if levels else 0.0)
            probe_var[rows, d] = solved.probe_se.to("cpu", F64) ** 2
            nfe += solved.nfe * len(rows)
            if inp.progress is not None:
                inp.progress(d * n + int(rows[-1]) + 1, draws * n)
    spread = values.var(1) / draws if draws > 1 else probe_var[:, 0]
    details: dict[str, str | float | int] = {
        "solver": f"torchdiffeq dopri5, rtol {inp.rtol:g}, atol {inp.atol:g}",
        "probes": "exact trace (d ≤ probes)" if _exact_trace(inp) else inp.probes,
        "dequantization_draws": draws,
        "logsnr_range": f"[{inp.logsnr_min:.3f}, {inp.logsnr_max:.3f}]",
        "error": _error_source(draws, _exact_trace(inp)),
    }
    return Solved(Estimate(values.mean(1), spread), nfe / n, time.perf_counter() - start, details)
