"""Per-cell errors into the estimator units' bounds, per-image values and range diagnostics (docs/math.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from itdcli.core import estimators as est
from itdcli.core.kinds import Selection
from itdcli.core.proposal import Proposal
from itdcli.evaluation import units
from itdcli.evaluation.cellerrors import Candidate
from itdcli.evaluation.engine import Curves

EDGE_WINDOW = 0.05  # the outer share of the range's width whose cells give an integrand's value at an end
WORSE_Z = 3.0  # a bin counts as worse than the reference when the model's mean excess is this many errors
CONTROL_BINS = 16
SELECT_BINS = 32
MIN_SELECT_BINS = 16
CURVE_KNOTS = 24  # intervals of the crossfit mean curve subtracted from each integrand
CURVE_CELLS = 50  # training cells per interval at least
MISSING_SCALE = 2.0  # e^{−(γ − γ_R)/2}: the slowest decay above γ_R of a bounded density's advantage (jumps)
MIN_CURVE_KNOTS = 8  # fewer intervals follow the curve too coarsely: they raised the variance (4) or barely lowered it


@dataclass
class Scores:
    """Estimates per estimator name, their integrands, the choices per family and the range diagnostics.

    `worse` holds, per estimator, the logSNR intervals where the model's chosen error exceeds the Gaussian
    reference's by more than WORSE_Z standard errors; `missing` the estimated mass above the range (bpd).
    """

    estimates: dict[str, est.Estimate] = field(default_factory=dict)
    integrands: dict[str, Tensor] = field(default_factory=dict)
    choice: dict[str, Tensor] = field(default_factory=dict)
    candidates: dict[str, tuple[Candidate, ...]] = field(default_factory=dict)
    worse: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    missing: dict[str, float] = field(default_factory=dict)

    def merge(self, other: Scores) -> None:
        """Add the estimators of another pass (scored on its own points)."""
        self.estimates.update(other.estimates)
        self.integrands.update(other.integrands)
        self.choice.update(other.choice)
        self.candidates.update(other.candidates)
        self.worse.update(other.worse)
        self.missing.update(other.missing)


@dataclass(frozen=True)
class Rule:
    """How the denoiser is chosen per logSNR bin: candidates per family, and optional selection means.

    Without `candidates` a family chooses among its unit's own projections of the model; `paper_clamp` adds
    the Gaussian reference's linear denoiser (the paper's max(0, mmse_G − m̄), an ensemble with N(μ, Σ)).
    Without `select_means` the choice follows `selection` over the scored images (crossfit folds by default);
    with it, each column takes the candidate whose mean error on separate selection data is lowest.
    `control` subtracts the Gaussian denoiser's error on the same noise draw as a control variate.
    """

    candidates: Mapping[str, tuple[Candidate, ...]] | None = None
    select_means: Mapping[Candidate, Tensor] | None = None
    control: bool = True
    paper_clamp: bool = False

    def names(self, unit: units.Unit, curves: Curves) -> tuple[Candidate, ...]:
        """The recorded candidates of a unit's family under this rule."""
        kinds = unit.paper if self.paper_clamp and unit.paper is not None else unit.candidates
        own = tuple(map(Candidate, kinds)) if self.candidates is None else self.candidates[unit.family]
        names = (*own, Candidate(unit.reference)) if self.paper_clamp else own
        return tuple(n for n in names if curves.errors.error(n) is not None)


def _pick(
    curves: Curves,
    unit: units.Unit,
    folds: Tensor,
    selection: Selection,
    out: Scores,
    rule: Rule,
    proposal: Proposal,
) -> tuple[Tensor, Tensor | None]:
    """The per-cell error of the denoiser chosen per logSNR bin among the kind's candidates, with crossfit fits.

    With the control variates, each noisy candidate's errors are corrected first (its own slopes per bin), so
    the choice compares the quieter corrected means; the same error with every fit made within the cell's own
    fold is returned too, for the mean-curve control (else None).
    """
    names = rule.names(unit, curves)
    stack = curves.errors.stack(names)
    cv = curves.errors.controls(unit.controls) if rule.control else None
    cv_bins = _bins(curves, proposal, CONTROL_BINS)
    # 16 to 32 bins, finer with more points per image; never as coarse as the columns of a small round
    select_bins = _bins(curves, proposal, _select_count(curves))
    crossfit = _corrected(stack, names, cv, curves.weight, cv_bins, folds)
    choice = _choice(crossfit, names, folds, selection, select_bins, rule)
    out.choice[unit.family], out.candidates[unit.family] = choice, names
    if not rule.control:
        return est.chosen(crossfit, choice), None
    own = torch.zeros_like(crossfit[0])
    within: Selection = "none" if selection == "none" else "same"
    for fold in range(int(folds.max()) + 1):
        rows = folds == fold
        sub = _corrected(stack[:, rows], names, None if cv is None else cv[:, rows], curves.weight[rows], cv_bins[rows])
        own[rows] = est.chosen(sub, _choice(sub, names, torch.zeros_like(folds[rows]), within, select_bins[rows], rule))
    return est.chosen(crossfit, choice), own


def _corrected(
    stack: Tensor,
    names: tuple[Candidate, ...],
    cv: Tensor | None,
    weight: Tensor,
    bins: Tensor,
    folds: Tensor | None = None,
) -> Tensor:
    """Each noisy candidate's errors minus its control variates, slopes crossfit over `folds` or else in-sample."""
    if cv is None:
        return stack
    fitted = []
    for name, e in zip(names, stack, strict=True):
        if name.exact:
            fitted.append(e)
        elif folds is None:
            fitted.append(est.control_variate_in_sample(e, cv, weight, bins))
        else:
            fitted.append(est.control_variate(e, cv, weight, bins, folds))
    return torch.stack(fitted)


def _choice(
    stack: Tensor, names: tuple[Candidate, ...], folds: Tensor, selection: Selection, bins: Tensor, rule: Rule
) -> Tensor:
    """Per cell, the chosen candidate: by `selection` over these cells, or by the rule's separate selection means."""
    if rule.select_means is None:
        return est.choose(stack, folds, selection, bins)
    means = torch.stack([rule.select_means[n] for n in names])
    return means.argmin(0).expand(stack.shape[1], -1).clone()


def _curve_control(curves: Curves, proposal: Proposal, folds: Tensor, own: Tensor | None) -> est.CurveControl | None:
    """The crossfit mean-curve control on knots at the proposal's quantiles, one interval per CURVE_CELLS cells.

    None without control variates, or with cells for fewer than MIN_CURVE_KNOTS intervals: so coarse a curve
    adds more variance than it removes (benchmarks/curve_control.py).
    """
    intervals = min(CURVE_KNOTS, curves.logsnr.numel() // (2 * CURVE_CELLS))
    if own is None or intervals < MIN_CURVE_KNOTS:
        return None
    return est.CurveControl(curves.logsnr, curves.weight, folds, proposal.quantile_edges(intervals), own)


def _select_count(curves: Curves) -> int:
    """Bins of the per-logSNR choice: 16 to 32, finer with more points per image."""
    return max(MIN_SELECT_BINS, min(SELECT_BINS, curves.logsnr.shape[1]))


def winners(
    curves: Curves, proposal: Proposal, choice: Tensor, labels: Sequence[str]
) -> list[tuple[float, float, str]]:
    """(from, to, label) per run of choice bins, each bin labelled by the candidate most of its cells were given.

    `labels` names each candidate; neighbouring bins of one label (a member's rounded and clamped errors, say)
    make one interval.
    """
    count = _select_count(curves)
    bins = _bins(curves, proposal, count).reshape(-1)
    tally = torch.zeros(count, len(labels), dtype=torch.long)
    tally.index_put_((bins, choice.reshape(-1)), torch.tensor(1), accumulate=True)
    per_bin = [labels[int(t.argmax())] if int(t.sum()) else None for t in tally]
    return _spans(proposal.quantile_edges(count).tolist(), per_bin, bridge=True)


def _spans(edges: list[float], labels: Sequence[str | None], bridge: bool = False) -> list[tuple[float, float, str]]:
    """(from, to, label) for each run of equal labels over the bins between `edges`; unlabelled bins are skipped.

    With `bridge`, a run continues over skipped bins (a choice bin without cells has no winner of its own).
    """
    spans: list[tuple[float, float, str]] = []
    for i, label in enumerate(labels):
        if label is None:
            continue
        if spans and spans[-1][2] == label and (bridge or spans[-1][1] == edges[i]):
            spans[-1] = (spans[-1][0], edges[i + 1], label)
        else:
            spans.append((edges[i], edges[i + 1], label))
    return spans


def _bins(curves: Curves, proposal: Proposal, count: int) -> Tensor:
    """Each cell's logSNR bin, by `count` quantiles of the proposal (for the choice and the control variate)."""
    return torch.bucketize(curves.logsnr.contiguous(), proposal.quantile_edges(count)[1:-1])


def score(
    curves: Curves,
    inp: units.Inputs,
    proposal: Proposal,
    names: list[str],
    selection: Selection,
    seed: int,
    rule: Rule | None = None,
) -> Scores:
    """Every requested estimator unit from one set of curves (units of one family share their choice)."""
    rule = rule or Rule()
    out = Scores()
    folds = est.crossfit_folds(len(curves.index), 2, torch.Generator().manual_seed(seed + 1))
    errors = curves.errors
    cells = units.Cells(curves.logsnr, errors.gauss, inp.ref.mmse(curves.logsnr))
    picked: dict[str, tuple[Tensor, Tensor | None]] = {}
    for unit in units.units(names):
        if unit.discrete_only and not inp.levels:
            continue
        if unit.family not in picked:
            picked[unit.family] = _pick(curves, unit, folds, selection, out, rule, proposal)
        e, own = picked[unit.family]

        def form(err: Tensor, unit: units.Unit = unit) -> Tensor:
            return unit.form(err, cells)

        curve = _curve_control(curves, proposal, folds, own)
        integrand = form(e)
        gap = est.integral(curves.weight, integrand, curves.groups, curve.baseline(form) if curve else None)
        name = unit.name + ("_paper_clamp" if rule.paper_clamp else "")
        out.estimates[name] = gap.shifted(unit.value(gap.per_image, inp))
        out.integrands[name] = integrand
        reference = errors.error(Candidate(unit.reference))
        if reference is not None and rule.candidates is None and not rule.paper_clamp:
            bins = _bins(curves, proposal, MIN_SELECT_BINS)
            out.worse[name] = _worse(e - reference, bins, proposal, MIN_SELECT_BINS)
        if unit.decoder == "identity" and (not inp.levels or unit.family == "dequantized"):
            missing = _missing_above(e, curves.logsnr, proposal, inp.ref.dim)
            out.missing[name] = missing / (inp.ref.dim * math.log(2))
    return out


def _worse(excess: Tensor, bins: Tensor, proposal: Proposal, count: int) -> list[tuple[float, float]]:
    """The logSNR intervals (merged bins) where the mean excess error is above zero by more than WORSE_Z errors."""
    b, v = bins.reshape(-1), excess.reshape(-1).to(torch.float64)
    n = torch.bincount(b, minlength=count).to(torch.float64)
    mean = torch.zeros(count, dtype=torch.float64).index_add_(0, b, v) / n.clamp_min(1)
    square = torch.zeros(count, dtype=torch.float64).index_add_(0, b, (v - mean[b]) ** 2)
    se = (square / (n - 1).clamp_min(1) / n.clamp_min(1)).sqrt()
    flagged = ["worse" if bad else None for bad in ((mean > WORSE_Z * se) & (n > 2)).tolist()]
    return [(lo, hi) for lo, hi, _ in _spans(proposal.quantile_edges(count).tolist(), flagged)]


def _missing_above(err: Tensor, logsnr: Tensor, proposal: Proposal, dim: int) -> float:
    """Mass the identity decoder above γ_R may give away, ½∫_{γ_R}^∞ (d − m) dγ, in nats per image.

    The model's advantage over the identity near the top, ½(d − m) less two standard errors in the cells within
    EDGE_WINDOW of γ_R, is extrapolated with the slowest decay a bounded density shows, e^{−(γ − γ_R)/2}
    (MISSING_SCALE): a density with a jump, such as uniform dequantization of isolated levels, decays that slowly.
    Zero when the model is no better than the identity there.
    """
    reach = EDGE_WINDOW * (proposal.logsnr_max - proposal.logsnr_min)
    advantage = (0.5 * (dim - err.to(torch.float64)))[logsnr >= proposal.logsnr_max - reach]
    if advantage.numel() < 3:
        return 0.0
    mean, se = float(advantage.mean()), float(advantage.std()) / math.sqrt(advantage.numel())
    return max(0.0, MISSING_SCALE * (mean - 2 * se))


def end_above(logsnr_max: float, missing: float, allowed: float) -> float:
    """The top of the range that leaves `allowed` of the `missing` mass above it, under `_missing_above`'s decay.

    ∫_{γ′}^∞ of e^{−(γ − γ_R)/s} is e^{−(γ′ − γ_R)/s} of that from γ_R, so γ′ = γ_R + s·log(missing/allowed);
    an exact estimate (allowed = 0) gets s·4, which leaves e^{−4} of it.
    """
    return logsnr_max + MISSING_SCALE * (math.log(missing / allowed) if allowed > 0 else 4.0)
