"""`itdcli.nll`: bits/dim of a dataset under a diffusion model through the I-MMSE integral (Kong et al., ICLR 2023)."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from itdcli import runtime
from itdcli.api import records
from itdcli.api.results import DataInfo, EstimateResult, NllResult, ProposalInfo, ReferenceInfo
from itdcli.core import controls
from itdcli.core import estimators as est
from itdcli.core.gaussian import GaussianReference
from itdcli.core.proposal import (
    PAPER_SCALE_CONSTANT,
    BaseProposalKind,
    PointScheme,
    Proposal,
    fit_adaptive,
    logistic_from_spectrum,
)
from itdcli.core.units import bits_per_dim
from itdcli.errors import ItdError

EstimatorChoice = Literal["continuous", "discrete", "dequantized", "all"]
FLOAT32_LOGSNR_LIMIT = 30.0
STANDARD_NORMAL = "standard-normal"
DEFAULT_TARGET_STDERR = 0.005
FIRST_ROUND_POINTS = 16
MIN_ROUND_POINTS = 8


class NllOptions(BaseModel):
    """Every setting of an `itd nll` run except the data, model and reference."""

    model_config = ConfigDict(extra="forbid")

    estimator: EstimatorChoice | None = None
    discrete: bool = False
    points: PositiveInt | None = None
    target_stderr: float | None = Field(None, gt=0)
    target_image_stderr: float | None = Field(None, gt=0)
    max_points: PositiveInt = 1024
    adapt: bool = True
    pilot_points: PositiveInt = 8
    pilot_images: PositiveInt = 64
    draws: PositiveInt = 1
    antithetic: bool = False
    control_variate: bool = True
    precision: runtime.PrecisionName = "auto"
    channels_last: bool | None = None
    compile: bool = False
    seed: int = Field(0, ge=0)
    batch_size: PositiveInt | None = None
    device: str = "auto"
    limit: PositiveInt | None = None
    selection: est.Selection = "crossfit"
    rounding: Literal["soft", "hard"] = "soft"
    scheme: PointScheme = "stratified"
    proposal: BaseProposalKind = "logistic"
    scale_constant: float = Field(PAPER_SCALE_CONSTANT, gt=0)
    clip: float = Field(4.0, gt=0)
    logsnr_min: float | None = None
    logsnr_max: float | None = None
    loc: float | None = None
    scale: float | None = Field(None, gt=0)
    levels: int | None = Field(None, ge=2)
    time_map: Literal["exact", "reference"] = "exact"
    out: Path | None = None
    overwrite: bool = False
    save: bool = True


def _estimator_names(opts: NllOptions, discrete_data: bool) -> list[str]:
    """The estimators a run reports: --discrete, --estimator, or by default all that the data allow."""
    if opts.discrete and opts.estimator not in (None, "discrete"):
        raise ItdError(f"--discrete conflicts with --estimator {opts.estimator}: give one of them")
    choice = "discrete" if opts.discrete else opts.estimator or ("all" if discrete_data else "continuous")
    if choice in ("discrete", "dequantized") and not discrete_data:
        raise ItdError(
            f"the {choice} estimator needs discrete data, but these are float values: "
            "use --estimator continuous, or give integer data (uint8 images, or an integer .npz with --levels)"
        )
    names = {"continuous": ["continuous", "continuous_pointwise"], "discrete": ["discrete"]}
    names["dequantized"] = ["dequantized"]
    if choice == "all":
        return ["continuous", "continuous_pointwise", *(["discrete", "dequantized"] if discrete_data else [])]
    return names[choice]


def _eig_floor(data: Any) -> float:
    """Eigenvalue floor of a fitted covariance: one bin's variance δ²/12 for discrete data, else 1e-6 of the mean."""
    if data.levels:
        return float((2.0 / (data.levels - 1)) ** 2 / 12)
    return float(data.values().to(torch.float64).var(0).mean()) * 1e-6


@dataclass(frozen=True)
class ResolvedReference:
    """The reference used by the estimators, the fitted spectrum that shapes the proposal, and their origin."""

    ref: GaussianReference
    spectrum: GaussianReference
    source: str
    sha256: str | None
    floor: float


def fit_reference(ref_data: Any) -> tuple[GaussianReference, float]:
    """N(μ, Σ) of a dataset with its eigenvalue floor, cached under the itd home by content hash."""
    floor = _eig_floor(ref_data)
    key = hashlib.sha256(f"{ref_data.sha256}:{floor!r}".encode()).hexdigest()[:32]
    ref = records.cached_reference(key)
    if ref is None:
        ref = GaussianReference.fit(ref_data.values(), floor)
        records.store_reference(key, ref)
    return ref, floor


def resolve_reference(reference: Any, data: Any) -> ResolvedReference:
    """A given reference; N(0, I); or N(μ, Σ) fitted on `reference` data, else the family's training split."""
    from itdcli.data import load_data

    if isinstance(reference, GaussianReference):
        return ResolvedReference(reference, reference, "<GaussianReference>", None, 0.0)
    standard = reference == STANDARD_NORMAL
    ref_data = load_data(data.train or data if reference is None or standard else reference)
    if tuple(ref_data.shape) != tuple(data.shape):
        raise ItdError(
            f"reference data '{ref_data.name}' has images of shape {tuple(ref_data.shape)} but the scored data "
            f"have {tuple(data.shape)}: give a --reference of the same image size"
        )
    fitted, floor = fit_reference(ref_data)
    ref = GaussianReference.standard(data.dim) if standard else fitted
    return ResolvedReference(ref, fitted, STANDARD_NORMAL if standard else ref_data.name, ref_data.sha256, floor)


def make_proposal(opts: NllOptions, spectrum: GaussianReference) -> Proposal:
    """The logSNR proposal from the data's fitted spectrum, with any loc/scale/range overrides (spec §6.2)."""
    base = logistic_from_spectrum(spectrum.log_eigvals, opts.scale_constant, opts.clip)
    loc = base.loc if opts.loc is None else opts.loc
    scale = base.scale if opts.scale is None else opts.scale
    lo = loc - opts.clip * scale if opts.logsnr_min is None else opts.logsnr_min
    hi = loc + opts.clip * scale if opts.logsnr_max is None else opts.logsnr_max
    if not lo < hi:
        raise ItdError(f"empty logSNR range [{lo:g}, {hi:g}]: --logsnr-min must be below --logsnr-max")
    return Proposal(opts.proposal, loc, scale, lo, hi)


def _subset(n: int, limit: int | None, seed: int) -> torch.Tensor:
    """All image indices, or a seeded random subset of `limit` of them in index order (never just the first ones)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _estimate_result(e: est.Estimate, dim: int) -> EstimateResult:
    """Nats per image and bits/dim, with None for an undefined standard error."""
    se = None if math.isnan(e.stderr) else e.stderr
    sampling = None if math.isnan(e.sampling_stderr) else bits_per_dim(e.sampling_stderr, dim)
    return EstimateResult(
        bpd=bits_per_dim(e.mean, dim),
        stderr_bpd=None if se is None else bits_per_dim(se, dim),
        nats=e.mean,
        stderr_nats=se,
        sampling_stderr_bpd=sampling,
    )


class _Run:
    """The evaluation of one `itd nll`: an optional pilot that adapts the proposal, then rounds of points."""

    def __init__(
        self,
        net: Any,
        dataset: Any,
        ref: GaussianReference,
        device: torch.device,
        index: torch.Tensor,
        names: list[str],
        opts: NllOptions,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        """Hold the inputs; the target is the option, or the default when no fixed --points is given."""
        self.net, self.dataset, self.ref, self.device, self.index = net, dataset, ref, device, index
        self.names, self.opts, self.progress = names, opts, progress
        self.values = dataset.values(index)  # the scored images on the model scale, for every round's scoring
        self.target = opts.target_stderr or (None if opts.points else DEFAULT_TARGET_STDERR)
        self.image_target = opts.target_image_stderr
        self.evals = self.pilot_evals = 0.0
        self.round_count = 0
        self.done = 0

    def _tick(self, n: int, total: int) -> None:
        """Progress in points of this rank, against the points planned so far."""
        self.done += n
        if self.progress is not None and runtime.is_main():
            self.progress(self.done, total)

    def _evaluate(self, plan: Any, index: torch.Tensor) -> Any:
        """One round of `plan` over `index`, counting network forwards and reporting progress."""
        from itdcli import engine

        total = self.done + len(engine.local_rows(index)) * plan.points
        curves = engine.evaluate(
            self.net, self.dataset, self.ref, plan, self.device, index, lambda n: self._tick(n, total)
        )
        return curves, engine.evals_per_image(plan) * len(index)

    def adapt(self, plan: Any) -> Any:
        """A pilot on a seeded subset of the data fits the proposal to this model's integrands (its forwards count)."""
        from dataclasses import replace

        from itdcli import engine, scoring

        # pilot images are drawn from the whole dataset, so the proposal does not depend on --limit
        rows = _subset(len(self.dataset), self.opts.pilot_images, self.opts.seed + 3)
        pilot = replace(plan, points=self.opts.pilot_points, stream=engine.PILOT_STREAM)
        curves, evals = self._evaluate(pilot, rows)
        self.pilot_evals = self.evals = float(evals)
        # each estimator's integrand with the model's own denoiser (selection "none"), no control variate
        raw = scoring.score(
            curves,
            self.ref,
            self.dataset.values(rows),
            plan.proposal,
            self.dataset.levels,
            self.names,
            "none",
            self.opts.seed,
            scoring.Rule(control=False),
        )
        fitted = fit_adaptive(plan.proposal, curves.logsnr, list(raw.integrands.values()))
        return replace(plan, proposal=fitted)

    def _passes(self) -> dict[str, list[str]]:
        """The estimators of each pass: the network on x (continuous, discrete), on dequantized x."""
        main = [n for n in self.names if n != "dequantized"]
        passes = {"main": main, "deq": ["dequantized"] if "dequantized" in self.names else []}
        return {p: names for p, names in passes.items() if names}

    def rounds(self, plan: Any) -> tuple[dict[str, Any], Any]:
        """Rounds of points until every reported Monte Carlo standard error meets the target (or the cap).

        Each pass adds only the points its own estimators still need, so the dequantized pass (a second
        forward per point) stops as soon as its estimate is precise enough.
        """
        passes = self._passes()
        curves: dict[str, Any] = {}
        want = dict.fromkeys(passes, plan.points)
        while want:
            for name, more in self._round(plan, want).items():
                curves[name] = more if name not in curves else curves[name].extended(more)
            self.round_count += 1
            scores = self._score(curves, plan)
            want = {p: self._next_round(scores, passes[p], int(curves[p].logsnr.shape[1])) for p in passes}
            want = {p: k for p, k in want.items() if k > 0}
        return curves, scores

    def _round(self, plan: Any, want: dict[str, int]) -> dict[str, Any]:
        """One round: the passes share their points when they want as many, else each draws its own."""
        from dataclasses import replace

        stream = self.round_count
        if len(set(want.values())) == 1:
            shared = replace(plan, points=next(iter(want.values())), stream=stream)
            both, evals = self._evaluate(replace(shared, want_main="main" in want, want_deq="deq" in want), self.index)
            self.evals += evals
            return {p: both.subset(PASS_ERRORS[p]) for p in want}
        out = {}
        for p, k in want.items():
            one = replace(plan, points=k, stream=stream, want_main=p == "main", want_deq=p == "deq")
            out[p], evals = self._evaluate(one, self.index)
            self.evals += evals
        return out

    def _score(self, curves: dict[str, Any], plan: Any) -> Any:
        """Every estimator of every pass, scored on that pass's points."""
        from itdcli import scoring

        passes = self._passes()
        merged = scoring.Scores()
        for p, c in curves.items():
            merged.merge(
                scoring.score(
                    c,
                    self.ref,
                    self.values,
                    plan.proposal,
                    self.dataset.levels,
                    passes[p],
                    self.opts.selection,
                    self.opts.seed,
                    scoring.Rule(control=self.opts.control_variate),
                )
            )
        return merged

    def _next_round(self, scores: Any, names: list[str], done: int) -> int:
        """Points per image a pass adds next, as 1/√points predicts for the targets; 0 once met or capped.

        The dataset target bounds each estimator's Monte Carlo standard error; the per-image target, the root
        mean square over images of their own errors (se/NAME). A round has at least MIN_ROUND_POINTS points,
        so that it stays stratified.
        """
        if (self.target is None and self.image_target is None) or done >= self.opts.max_points:
            return 0
        dim = self.dataset.dim
        ratio = 0.0
        for n in names:
            e = scores.estimates[n]
            if self.target is not None:
                ratio = max(ratio, bits_per_dim(e.stderr, dim) / self.target)
            if self.image_target is not None:
                per_image = math.sqrt(float(e.mc_var.clamp_min(0).mean()))
                ratio = max(ratio, bits_per_dim(per_image, dim) / self.image_target)
        if not ratio > 1:
            return 0
        wanted = math.ceil(done * (ratio**2 - 1))
        return min(max(MIN_ROUND_POINTS, wanted + wanted % 2), self.opts.max_points - done)


# The errors each pass records.
PASS_ERRORS = {
    "main": ("gauss", "cv", "model", "round", *controls.NAMES),
    "deq": ("deq", "gauss_deq", "cv_deq", *controls.NAMES),
}


def _arrays(curves: dict[str, Any], scores: Any, ref: GaussianReference, dim: int) -> dict[str, torch.Tensor]:
    """The per-image and per-cell arrays saved beside result.json (a separate dequantized pass under deq/)."""
    main = curves["main"] if "main" in curves else curves["deq"]
    arrays = {"index": main.index, "logsnr": main.logsnr, "weight": main.weight, "eigvals": ref.eigvals}
    arrays["groups"] = main.groups
    deq = curves.get("deq")
    split = deq is not None and deq is not main and not torch.equal(deq.logsnr, main.logsnr)
    if deq is not None and split:
        arrays.update({"deq/logsnr": deq.logsnr, "deq/weight": deq.weight, "deq/groups": deq.groups})
    for c in curves.values():
        # errors both passes record (the noise moments) are the dequantized pass's own under deq/ when split
        own = "deq/" if split and c is deq else ""
        arrays.update({f"{own if k in main.errors else ''}mse/{k}": v.to(torch.float32) for k, v in c.errors.items()})
    arrays.update({f"choice/{k}": v.to(torch.uint8) for k, v in scores.choice.items()})
    for name, e in scores.estimates.items():
        arrays[f"bpd/{name}"] = e.per_image / (dim * math.log(2))
        arrays[f"se/{name}"] = e.mc_var.clamp_min(0).sqrt() / (dim * math.log(2))  # per-image Monte Carlo error
    return arrays


def nll(
    data: Any,
    model: Any = "gaussian",
    *,
    reference: Any = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> NllResult:
    """Bits/dim of `data` under `model` by the I-MMSE integral; `options` are the fields of `NllOptions`.

    `data` is a dataset name, a path (image folder, .npz), a tensor or a `Dataset`; `model` a registered
    name, `module.path:attribute`, or any callable eps_hat = model(z, logsnr). `progress(done, total)`
    is called as cells are evaluated. The run is kept as a record under `out` or the itd home's runs/.
    Under torchrun the ranks share the images and all return the same result; only rank 0 reports
    progress and writes the record.
    """
    from itdcli import __version__, engine
    from itdcli.data import load_data
    from itdcli.models import load_model

    opts = NllOptions(**options)
    if opts.out is not None:
        records.check_out_dir(opts.out, opts.overwrite)
    dataset = load_data(data, levels=opts.levels)
    names = _estimator_names(opts, dataset.levels is not None)
    device = runtime.local_device(opts.device)
    resolved = resolve_reference(reference, dataset)
    ref = resolved.ref
    proposal = make_proposal(opts, resolved.spectrum)
    denoiser = load_model(model, ref, opts.time_map)
    _check_input_shape(denoiser, dataset)
    index = _subset(len(dataset), opts.limit, opts.seed)
    plan = engine.Plan(
        proposal,
        opts.points or FIRST_ROUND_POINTS,
        opts.scheme,
        opts.seed,
        opts.batch_size or engine.default_batch_size(dataset.dim, device),
        opts.rounding,
        want_round="discrete" in names,
        want_deq="dequantized" in names,
        draws=opts.draws,
        antithetic=opts.antithetic,
        precision=runtime.precision(opts.precision, device),
        channels_last=runtime.channels_last(opts.channels_last, device),
        fixed_shape=opts.compile,
    )
    runtime.init_distributed(device)
    runtime.barrier()  # every rank has checked its inputs and --out before rank 0 can write
    net = runtime.prepare_model(denoiser, device, plan.channels_last, opts.compile)
    run = _Run(net, dataset, ref, device, index, names, opts, progress)
    start = time.perf_counter()
    if opts.adapt:
        plan = run.adapt(plan)
    curves, scores = run.rounds(plan)
    seconds = time.perf_counter() - start
    main = curves["main"] if "main" in curves else curves["deq"]
    proposal = plan.proposal
    result = NllResult(
        itd_version=__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        data=DataInfo(
            name=dataset.name,
            sha256=dataset.sha256,
            n_images=len(index),
            shape=list(dataset.shape),
            levels=dataset.levels,
        ),
        model=_model_name(model),
        reference=_reference_info(resolved, opts),
        proposal=ProposalInfo(
            kind=proposal.kind,
            loc=proposal.loc,
            scale=proposal.scale,
            scale_constant=opts.scale_constant,
            clip=opts.clip,
            logsnr_min=proposal.logsnr_min,
            logsnr_max=proposal.logsnr_max,
            scheme=opts.scheme,
            edges=list(proposal.edges),
            mass=list(proposal.mass),
        ),
        points=int(main.logsnr.shape[1]),
        deq_points=int(curves["deq"].logsnr.shape[1]) if "deq" in curves else None,
        seed=opts.seed,
        batch_size=plan.batch_size,
        selection=opts.selection,
        rounding=opts.rounding,
        time_map=str(getattr(denoiser, "time_map", opts.time_map)),
        candidates={k: list(v) for k, v in scores.candidates.items()},
        estimates={n: _estimate_result(scores.estimates[n], dataset.dim) for n in names},
        evals_per_image=run.evals / len(index),
        seconds=seconds,
        device=str(device),
        precision=plan.precision.describe(),
        rounds=run.round_count,
        target_stderr_bpd=run.target,
        target_image_stderr_bpd=run.image_target,
        pilot_evals_per_image=run.pilot_evals / len(index),
        draws=opts.draws,
        antithetic=opts.antithetic,
        stderr_method=(
            f"Monte Carlo: spread of each image's {opts.scheme} points within their strata (two points per stratum) "
            "or rounds (iid), √(Σ var)/N over images; "
            "sampling_stderr_bpd: std/√N over per-image values"
        ),
        warnings=scores.warnings + _run_warnings(reference, dataset, proposal, denoiser),
        arrays=_arrays(curves, scores, ref, dataset.dim),
    )
    if opts.save:
        _save(result, opts.out, dataset.name)
    return result


def _save(result: NllResult, out: Path | None, data_name: str) -> None:
    """Rank 0 writes the run record; every rank gets its folder in `run_dir`, or fails with rank 0's error."""
    from itdcli import runtime

    failure: Exception | None = None
    if runtime.is_main():
        try:
            records.write_run(result, out or records.new_run_dir(result.model, data_name))
        except Exception as exc:
            failure = exc
    run_dir, message = runtime.broadcast_object((result.run_dir, None if failure is None else str(failure)))
    if failure is not None:
        raise failure
    if message is not None:
        raise ItdError(f"rank 0 could not write the run record: {message}")
    result.run_dir = run_dir


def _model_name(model: Any) -> str:
    """The model as named on the command line, or the qualified name of a Python callable or module."""
    if isinstance(model, str):
        return model
    return str(getattr(model, "__qualname__", None) or type(model).__qualname__)


def _reference_info(resolved: ResolvedReference, opts: NllOptions) -> ReferenceInfo:
    """Where the reference came from, its entropy, floor and the proposal its spectrum implies."""
    implied = logistic_from_spectrum(resolved.spectrum.log_eigvals, opts.scale_constant, opts.clip)
    return ReferenceInfo(
        source=resolved.source,
        sha256=resolved.sha256,
        entropy_nats=resolved.ref.entropy(),
        eig_floor=resolved.floor,
        spectrum_loc=implied.loc,
        spectrum_scale=implied.scale,
    )


def _check_input_shape(denoiser: Any, dataset: Any) -> None:
    """Refuse data whose per-image shape the model does not take, before any work."""
    shape = getattr(denoiser, "input_shape", None)
    if shape is not None and tuple(shape) != tuple(dataset.shape):
        raise ItdError(
            f"the model takes images of shape {tuple(shape)} (C, H, W) but '{dataset.name}' has "
            f"{tuple(dataset.shape)}: use data of the model's size"
        )


def _run_warnings(reference: Any, dataset: Any, proposal: Proposal, denoiser: Any) -> list[str]:
    """Protocol warnings: reference fitted on the scored data, range beyond the model's training or float32."""
    warnings = []
    trained = getattr(denoiser, "trained_logsnr", None)
    if trained is not None and (proposal.logsnr_min < trained[0] or proposal.logsnr_max > trained[1]):
        warnings.append(
            f"the logSNR range [{proposal.logsnr_min:.2f}, {proposal.logsnr_max:.2f}] goes beyond the model's "
            f"trained range [{trained[0]:.2f}, {trained[1]:.2f}]: there its time input is clamped and the network "
            "extrapolates; the estimators stay valid but the bounds are looser (compare with --logsnr-min/--logsnr-max)"
        )
    if reference is None and dataset.train is None:
        warnings.append(
            f"no training split is known for '{dataset.name}': the Gaussian reference was fitted on the scored "
            "data themselves (valid, but pass --reference TRAIN_DATA to match the usual protocol)"
        )
    if proposal.logsnr_max > FLOAT32_LOGSNR_LIMIT:
        warnings.append(
            f"the range reaches logSNR {proposal.logsnr_max:.1f}, where a float32 network input can no longer "
            f"hold the noise (spec §11.1); consider --logsnr-max {FLOAT32_LOGSNR_LIMIT:g}"
        )
    return warnings
