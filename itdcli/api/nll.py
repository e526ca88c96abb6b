"""`itdcli.nll`: bits/dim of a dataset under a diffusion model through the I-MMSE integral (Kong et al., ICLR 2023)."""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from itdcli import runtime
from itdcli.api import records
from itdcli.api.options import NllOptions
from itdcli.api.options import parse as parse_options
from itdcli.api.results import (
    DataInfo,
    EstimateResult,
    NllResult,
    ProposalInfo,
    ReferenceInfo,
    SolverInfo,
    TailInfo,
)
from itdcli.core import estimators as est
from itdcli.core import tails
from itdcli.core.gaussian import GaussianReference
from itdcli.core.proposal import Proposal, logistic_from_spectrum
from itdcli.core.units import bits_per_dim
from itdcli.errors import ItdError
from itdcli.evaluation import likelihoods, rounds, scoring, units

FLOAT32_LOGSNR_LIMIT = 30.0
STANDARD_NORMAL = "standard-normal"
DEFAULT_TARGET_STDERR = 0.005
FIRST_ROUND_POINTS = 16
TAIL_SHARE = 0.1  # each closed-form tail is kept below this share of the target error
PAPER_CLIP = 4.0


def _estimator_names(opts: NllOptions, discrete_data: bool) -> list[str]:
    """The estimators a run reports: --discrete, --estimator, or by default those that bound the data's own law.

    On integer data the default is discrete and dequantized; the continuous density of integer data falls
    without limit as the top of the range rises, so it is reported only on request.
    """
    if opts.discrete and opts.estimator not in (None, "discrete"):
        raise ItdError(f"--discrete conflicts with --estimator {opts.estimator}: give one of them")
    choice = "discrete" if opts.discrete else opts.estimator
    if choice in ("discrete", "dequantized", "vlb") and not discrete_data:
        raise ItdError(
            f"the {choice} estimator needs discrete data, but these are float values: use --estimator continuous "
            "or ode, or give integer data (uint8 images, or an integer .npz with --levels)"
        )
    continuous = ["continuous", "continuous_pointwise"]
    if choice is None:
        return ["discrete", "dequantized"] if discrete_data else continuous
    if choice == "immse":  # every I-MMSE estimator, without the solver ones
        return [*continuous, *(["discrete", "dequantized"] if discrete_data else [])]
    if choice == "all":
        return [*continuous, *(["discrete", "dequantized", "vlb"] if discrete_data else []), "ode"]
    return continuous if choice == "continuous" else [choice]


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
    if len(ref_data) < 2:
        raise ItdError(
            f"'{ref_data.name}' has {len(ref_data)} image: fitting the Gaussian reference N(μ,Σ) needs at least two; "
            "give --reference with more images of this size, or --reference standard-normal"
        )
    floor = _eig_floor(ref_data)
    key = hashlib.sha256(f"{ref_data.sha256}:{floor!r}".encode()).hexdigest()[:32]
    ref = records.cached_reference(key)
    if ref is None:
        ref = GaussianReference.fit(ref_data.values(), floor)
        records.store_reference(key, ref)
    return ref, floor


def _load_reference(source: Any, data: Any) -> Any:
    """Reference data read at the scored data's levels; a reference on another scale is refused in one line."""
    from itdcli.data import load_data

    try:
        return load_data(source, levels=data.levels)
    except ItdError:
        other = load_data(source)
    have = f"{other.levels} levels" if other.levels else "float values"
    want = f"{data.levels} levels" if data.levels else "float values"
    raise ItdError(
        f"reference data '{other.name}' hold {have} but the scored data hold {want}: give a --reference on the "
        "scale of the data (--levels applies to both)"
    )


def resolve_reference(reference: Any, data: Any) -> ResolvedReference:
    """A given reference; N(0, I); or N(μ, Σ) fitted on `reference` data, else the family's training split.

    Reference data are read at the scored data's levels, so that both live on one [−1, 1] scale.
    """
    if isinstance(reference, GaussianReference):
        return ResolvedReference(reference, reference, "<GaussianReference>", None, 0.0)
    standard = reference == STANDARD_NORMAL
    ref_data = _load_reference(data.train or data if reference is None or standard else reference, data)
    if tuple(ref_data.shape) != tuple(data.shape):
        raise ItdError(
            f"reference data '{ref_data.name}' has images of shape {tuple(ref_data.shape)} but the scored data "
            f"have {tuple(data.shape)}: give a --reference of the same image size"
        )
    if standard and len(ref_data) < 2:  # nothing to fit: N(0, I) shapes the proposal too
        ref = GaussianReference.standard(data.dim)
        return ResolvedReference(ref, ref, STANDARD_NORMAL, None, 0.0)
    fitted, floor = fit_reference(ref_data)
    ref = GaussianReference.standard(data.dim) if standard else fitted
    return ResolvedReference(ref, fitted, STANDARD_NORMAL if standard else ref_data.name, ref_data.sha256, floor)


def tail_limit(opts: NllOptions, dim: int) -> float:
    """The most each closed-form tail may hold, in nats per image: TAIL_SHARE of the target error."""
    return TAIL_SHARE * (opts.target_stderr or DEFAULT_TARGET_STDERR) * dim * math.log(2)


def make_proposal(
    opts: NllOptions, spectrum: GaussianReference, ref: GaussianReference, names: list[str], levels: int | None
) -> Proposal:
    """The logistic proposal of the data's spectrum on the range its tails imply (docs/math.md, Range).

    --clip, --loc or --scale give the paper's range loc ± clip·scale instead; --logsnr-min/--logsnr-max
    fix either end.
    """
    base = logistic_from_spectrum(spectrum.log_eigvals, opts.scale_constant)
    loc = base.loc if opts.loc is None else opts.loc
    scale = base.scale if opts.scale is None else opts.scale
    if opts.clip is not None or opts.loc is not None or opts.scale is not None:
        clip = opts.clip or PAPER_CLIP
        lo, hi = loc - clip * scale, loc + clip * scale
    else:
        lo, hi = units.tail_range(names, ref, levels, tail_limit(opts, ref.dim))
        if not lo < hi:  # a target so loose that the tails alone meet it: the paper's range instead
            lo, hi = loc - PAPER_CLIP * scale, loc + PAPER_CLIP * scale
    lo = lo if opts.logsnr_min is None else opts.logsnr_min
    hi = hi if opts.logsnr_max is None else opts.logsnr_max
    if not lo < hi:
        raise ItdError(f"empty logSNR range [{lo:g}, {hi:g}]: --logsnr-min must be below --logsnr-max")
    return Proposal(opts.proposal, loc, scale, lo, hi)


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


@runtime_checkable
class StagedProgress(Protocol):
    """A `progress(done, total)` that can also be told a solver's stage begins, counted in its own unit."""

    def __call__(self, done: int, total: int) -> None:
        """`done` of `total` in the current stage's unit."""

    def stage(self, label: str, unit: str) -> None:
        """The next stage begins (the solver `label`, counting `unit`)."""


def _solve(
    names: list[str],
    net: Any,
    dataset: Any,
    index: torch.Tensor,
    device: torch.device,
    ref: GaussianReference,
    plan: Any,
    opts: NllOptions,
    target: float | None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The solver estimators (variational bound, probability-flow ODE) on the same images and range.

    Under torchrun each rank solves its own share of the images with no collective inside (its rounds aim at
    the target on its share, which meets it for the whole), and the per-image values are gathered after.
    """
    from itdcli.evaluation import engine

    p = plan.proposal
    local = engine.local_rows(index)
    inp = likelihoods.SolverInputs(
        net,
        dataset,
        local,
        device,
        ref,
        opts.seed,
        plan.batch_size,
        target,
        p.logsnr_min,
        p.logsnr_max,
        opts.vlb_full,
        opts.probes,
        opts.rtol,
        opts.atol,
        opts.ode_max_steps,
    )
    solved = {}
    for name in names:
        solver = units.SOLVERS[name]
        if isinstance(progress, StagedProgress):
            progress.stage(name, solver.unit)
        solved[name] = solver.run(replace(inp, progress=progress if runtime.is_main() else None))
    if len(local) != len(index):
        for done in solved.values():
            e, n = done.estimate, len(index)
            done.estimate = est.Estimate(runtime.gather_shards(e.per_image, n), runtime.gather_shards(e.mc_var, n))
            share = torch.tensor([done.evals_per_image * len(local)], dtype=torch.float64)
            done.evals_per_image = float(runtime.all_reduce_mean(share)) * runtime.world_size() / n
    return solved


def _solver_arrays(solved: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What the solver estimators keep beside the per-image values (the VLB's per-step profile)."""
    return {k: v for done in solved.values() for k, v in done.arrays.items()}


def _arrays(
    curves: dict[str, Any], scores: Any, ref: GaussianReference, dim: int, index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The per-image and per-cell arrays saved beside result.json; a dequantized pass on points of its own under deq/.

    When both passes drew the same points, their errors are saved side by side at the top level.
    """
    main = curves.get("main", curves.get("deq"))
    arrays = {"index": index, "eigvals": ref.eigvals, **({} if main is None else main.to_arrays())}
    deq = curves.get("deq")
    if deq is not None and main is not None and deq is not main:
        same, recorded = torch.equal(deq.logsnr, main.logsnr), set(main.errors.recorded())
        arrays.update(deq.subset(lambda k: k not in recorded).to_arrays() if same else deq.to_arrays("deq/"))
    arrays.update({f"choice/{k}": v.to(torch.uint8) for k, v in scores.choice.items()})
    for name, e in scores.estimates.items():
        arrays[f"bpd/{name}"] = e.per_image / (dim * math.log(2))
        arrays[f"se/{name}"] = e.mc_var.clamp_min(0).sqrt() / (dim * math.log(2))  # per-image Monte Carlo error
        if e.df is not None:
            arrays[f"df/{name}"] = e.df  # its degrees of freedom: a 95% interval is ± t_{0.975, df}·se
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
    opts = parse_options(options)
    with records.claimed_out(opts.out, opts.overwrite) as out:
        return _nll(data, model, reference, progress, opts if out is None else opts.model_copy(update={"out": out}))


def _nll(
    data: Any, model: Any, reference: Any, progress: Callable[[int, int], None] | None, opts: NllOptions
) -> NllResult:
    """The body of `nll`, run while its output location is held."""
    from itdcli import __version__
    from itdcli.data import load_data
    from itdcli.evaluation import engine
    from itdcli.models import load_model

    dataset = load_data(data, levels=opts.levels)
    names = _estimator_names(opts, dataset.levels is not None)
    device = runtime.local_device(opts.device)
    resolved = resolve_reference(reference, dataset)
    ref = resolved.ref
    proposal = make_proposal(opts, resolved.spectrum, ref, names, dataset.levels)
    denoiser = load_model(model, ref, opts.time_map)
    _check_input_shape(denoiser, dataset)
    index = rounds.subset(len(dataset), opts.limit, opts.seed)
    _check_constant_pixels(dataset, index)
    plan = engine.Plan(
        proposal,
        opts.points or FIRST_ROUND_POINTS,
        opts.scheme,
        opts.seed,
        opts.batch_size or engine.default_batch_size(dataset.dim, device),
        opts.rounding,
        kinds=units.kinds(names),
        draws=opts.draws,
        antithetic=opts.antithetic,
        precision=runtime.precision(opts.precision, device),
        channels_last=runtime.channels_last(opts.channels_last, device),
        fixed_shape=opts.compile,
    )
    joined = runtime.init_distributed(device)  # False inside a finetune, whose group outlives this evaluation
    runtime.barrier()  # every rank has checked its inputs and --out before rank 0 can write
    net = runtime.prepare_model(denoiser, device, plan.channels_last, opts.compile)
    target = opts.target_stderr or (None if opts.points else DEFAULT_TARGET_STDERR)
    settings = rounds.Settings(
        target,
        opts.target_image_stderr,
        opts.max_points,
        opts.pilot_images,
        opts.pilot_points,
        opts.seed,
        opts.selection,
        opts.control_variate,
        opts.paper_clamp,
    )
    integrals = [n for n in names if n in units.UNITS]
    run = rounds.Run(net, dataset, ref, device, index, integrals, settings, progress)
    start = time.perf_counter()
    plans = run.plans(plan)
    curves: dict[str, engine.Curves] = {}
    scores = scoring.Scores()
    if integrals:
        run.check_first(plans)
        if opts.adapt:
            plans = run.adapt(plans)
        curves, scores = run.rounds(plans)
    seconds = time.perf_counter() - start
    main = curves.get("main", curves.get("deq"))
    plan = plans.get("main", plans.get("deq", plan))
    proposal = plan.proposal
    tails = _tails(integrals, run.inputs(plan), tail_limit(opts, dataset.dim)) if integrals else {}
    solvers = [n for n in names if n in units.SOLVERS]
    solved = _solve(solvers, net, dataset, index, device, ref, plan, opts, target, progress)
    for name, done in solved.items():
        scores.estimates[name] = done.estimate
    reported = list(scores.estimates)
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
        proposal=_proposal_info(proposal, opts),
        deq_proposal=_proposal_info(plans["deq"].proposal, opts) if "deq" in plans and "main" in plans else None,
        points=0 if main is None else int(main.logsnr.shape[1]),
        deq_points=int(curves["deq"].logsnr.shape[1]) if "deq" in curves else None,
        seed=opts.seed,
        batch_size=plan.batch_size,
        selection=opts.selection,
        rounding=opts.rounding,
        time_map=str(getattr(denoiser, "time_map", opts.time_map)),
        candidates={k: [c.key for c in v] for k, v in scores.candidates.items()},
        estimates={n: _estimate_result(scores.estimates[n], dataset.dim) for n in reported},
        bound="paper-clamp" if opts.paper_clamp else "model",
        tails=tails,
        worse_than_reference={k: [list(span) for span in v] for k, v in scores.worse.items() if v},
        missing_above_bpd={k: v for k, v in scores.missing.items()},
        evals_per_image=run.evals / len(index),
        solvers={
            n: SolverInfo(evals_per_image=d.evals_per_image, seconds=d.seconds, details=d.details)
            for n, d in solved.items()
        },
        seconds=seconds,
        device=str(device),
        precision=plan.precision.describe(),
        rounds=run.round_count,
        target_stderr_bpd=settings.target,
        target_image_stderr_bpd=settings.image_target,
        pilot_evals_per_image=run.pilot_evals / len(index),
        draws=opts.draws,
        antithetic=opts.antithetic,
        stderr_method=(
            f"Monte Carlo: spread of each image's {opts.scheme} points within their strata (two points per stratum) "
            "or rounds (iid), √(Σ var)/N over images; "
            "sampling_stderr_bpd: std/√N over per-image values"
        ),
        warnings=_run_warnings(reference, dataset, proposal, denoiser)
        + _range_warnings(tails, scores, dataset.dim, run.inputs(plan))
        + run.warnings
        + [f"{n}: {d.details['warning']}" for n, d in solved.items() if "warning" in d.details],
        notes=_notes(_model_name(model), integrals, scores, dataset.levels, proposal),
        arrays={**_arrays(curves, scores, ref, dataset.dim, index), **_solver_arrays(solved)},
    )
    if opts.save:
        _save(result, opts.out, dataset.name)
    if joined:
        runtime.leave()
    return result


def _proposal_info(proposal: Proposal, opts: NllOptions) -> ProposalInfo:
    """The proposal and range a pass used, as saved in result.json."""
    return ProposalInfo(
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
    )


def _tails(names: list[str], inp: units.Inputs, limit: float) -> dict[str, TailInfo]:
    """Each estimator's closed-form tails in bpd: the Gaussian bound below γ_L, its own right term above γ_R."""
    scale = inp.ref.dim * math.log(2)
    left = tails.gaussian_left_tail(inp.logsnr_min, inp.ref.log_eigvals) / scale
    return {
        n: TailInfo(left_bpd=left, right_bpd=right / scale, limit_bpd=limit / scale)
        for n, right in units.right_tails(names, inp).items()
    }


def _range_warnings(tails: dict[str, TailInfo], scores: Any, dim: int, inp: units.Inputs) -> list[str]:
    """One line per tail above its limit (with the end that brings it under), and per estimate whose range may cut
    off more than half its error."""
    out = []
    for name, t in tails.items():
        for side, value in (("left", t.left_bpd), ("right", t.right_bpd)):
            if abs(value) > t.limit_bpd * (1 + 1e-9):
                flag, end = _end_for(name, side, t.limit_bpd * dim * math.log(2), inp)
                out.append(
                    f"{name}: the {side} tail beyond the logSNR range holds {value:.4f} bpd, above its limit "
                    f"{t.limit_bpd:.4f}: give {flag} {_outward(end, side):.2f} to bring it under"
                )
    for name, missing in scores.missing.items():
        allowed = 0.5 * bits_per_dim(scores.estimates[name].stderr, dim)
        if missing > allowed:
            end = _outward(scoring.end_above(inp.logsnr_max, missing, allowed), "right")
            out.append(
                f"{name}: about {missing:.4f} bpd may lie above the top of the logSNR range (the model still beats "
                f"the identity decoder there): give --logsnr-max {end:.2f} or more"
            )
    return out


def _outward(end: float, side: str) -> float:
    """`end` rounded to two decimals away from the range's centre, so the advised value keeps the tail under."""
    return math.floor(end * 100) / 100 if side == "left" else math.ceil(end * 100) / 100


def _end_for(name: str, side: str, limit: float, inp: units.Inputs) -> tuple[str, float]:
    """The flag and the end of the range at which the scored images' mean tail on `side` is `limit` nats."""
    unit = units.UNITS[name]
    if side == "left":
        left = lambda g: abs(float(unit.left(inp.with_range(logsnr_min=g)).mean()))  # noqa: E731
        return "--logsnr-min", tails.solve_end(left, limit, inp.logsnr_min, -1.0)
    right = lambda g: abs(float(unit.right(inp.with_range(logsnr_max=g)).mean()))  # noqa: E731
    return "--logsnr-max", tails.solve_end(right, limit, inp.logsnr_max, 1.0)


def _notes(model: str, names: list[str], scores: Any, levels: int | None, proposal: Proposal) -> list[str]:
    """Facts a reader needs beside the table: where the model is worse than N(μ, Σ); continuous on integer data."""
    out = []
    for name, spans in scores.worse.items():
        if spans:
            where = ", ".join(f"[{a:.2f}, {b:.2f}]" for a, b in spans)
            out.append(
                f"{name}: {model} is worse than its N(μ,Σ) reference on logSNR {where}; "
                f"`itd ensemble --model {model} --model gaussian` gives the bound that switches there"
            )
    if levels and "continuous" in names:
        out.append(
            f"continuous: on integer data the density falls without limit as the range's top rises; "
            f"these values hold for logSNR up to {proposal.logsnr_max:.2f}"
        )
    return out


def _check_constant_pixels(dataset: Any, index: torch.Tensor) -> None:
    """Refuse float data with a pixel that never varies: its density is a point mass, −log p = −∞ (docs/math.md)."""
    if dataset.levels or len(index) < 2:
        return
    x = dataset.x[index].reshape(len(index), -1)
    constant = (x == x[:1]).all(0).nonzero().flatten().tolist()
    if constant:
        shape = tuple(dataset.shape)
        where = ", ".join(str(tuple(int(v) for v in torch.unravel_index(torch.tensor(i), shape))) for i in constant[:3])
        more = f" and {len(constant) - 3} more" if len(constant) > 3 else ""
        raise ItdError(
            f"{len(constant)} pixel(s) of '{dataset.name}' never vary, e.g. at (C, H, W) {where}{more}: the density "
            "of such data is a point mass (−log p = −∞); score integer data with --levels, or remove those pixels"
        )


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
    implied = logistic_from_spectrum(resolved.spectrum.log_eigvals, opts.scale_constant)
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
    if trained is not None and (proposal.logsnr_min < trained[0] - 1e-6 or proposal.logsnr_max > trained[1] + 1e-6):
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
