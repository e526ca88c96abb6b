"""Turns per-cell error arrays into the named estimators, their per-image values and range warnings (spec §7)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from itdcli.core import controls
from itdcli.core import estimators as est
from itdcli.core.gaussian import GaussianReference
from itdcli.core.proposal import Proposal
from itdcli.engine import Curves

EDGE_TOLERANCE_BPD = 0.01
EDGE_WINDOW = 0.05  # the outer share of the range's width whose cells give an integrand's value at an end
CONTROL = {"continuous": "cv", "discrete": "cv", "dequantized": "cv_deq"}
EXACT = ("gauss", "gauss_deq")  # candidates whose error is an exact expectation, with no noise to control
CONTROL_BINS = 16
SELECT_BINS = 32
MIN_SELECT_BINS = 16
CURVE_KNOTS = 24  # intervals of the crossfit mean curve subtracted from each integrand
CURVE_CELLS = 50  # training cells per interval at least
MIN_CURVE_KNOTS = 8  # fewer intervals follow the curve too coarsely: they raised the variance (4) or barely lowered it

# Candidate denoisers per estimator, the first being the model's own (used alone under selection "none").
CANDIDATES = {
    "continuous": ("model", "gauss"),
    "discrete": ("round", "model", "gauss"),
    "dequantized": ("deq", "gauss_deq"),
}


@dataclass
class Scores:
    """Estimates per estimator name, the integrands whose ends were checked, and warnings."""

    estimates: dict[str, est.Estimate] = field(default_factory=dict)
    integrands: dict[str, Tensor] = field(default_factory=dict)
    choice: dict[str, Tensor] = field(default_factory=dict)
    candidates: dict[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def merge(self, other: Scores) -> None:
        """Add the estimators of another pass (scored on its own points)."""
        self.estimates.update(other.estimates)
        self.integrands.update(other.integrands)
        self.choice.update(other.choice)
        self.candidates.update(other.candidates)
        self.warnings += other.warnings


@dataclass(frozen=True)
class Rule:
    """How the denoiser is chosen per point column: candidate names per estimator, and optional selection means.

    Without `select_means` the choice follows `selection` over the scored images (crossfit folds by default);
    with it, each column takes the candidate whose mean error on separate selection data is lowest.
    `control` subtracts the Gaussian denoiser's error on the same noise draw as a control variate.
    """

    candidates: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(CANDIDATES))
    select_means: Mapping[str, Tensor] | None = None
    control: bool = True


def _pick(
    curves: Curves, kind: str, folds: Tensor, selection: est.Selection, out: Scores, rule: Rule, proposal: Proposal
) -> tuple[Tensor, Tensor | None]:
    """The per-cell error of the denoiser chosen per logSNR bin among the kind's candidates, with crossfit fits.

    With the control variates, each noisy candidate's errors are corrected first (its own slopes per bin), so
    the choice compares the quieter corrected means; the same error with every fit made within the cell's own
    fold is returned too, for the mean-curve control (else None).
    """
    names = tuple(n for n in rule.candidates[kind] if n in curves.errors)
    stack = torch.stack([curves.errors[n] for n in names])
    cv = _controls(curves, kind) if rule.control else None
    cv_bins = _bins(curves, proposal, CONTROL_BINS)
    # 16 to 32 bins, finer with more points per image; never as coarse as the columns of a small round
    select_bins = _bins(curves, proposal, max(MIN_SELECT_BINS, min(SELECT_BINS, curves.logsnr.shape[1])))
    crossfit = _corrected(stack, names, cv, curves.weight, cv_bins, folds)
    choice = _choice(crossfit, names, folds, selection, select_bins, rule)
    out.choice[kind], out.candidates[kind] = choice, names
    if not rule.control:
        return est.chosen(crossfit, choice), None
    own = torch.zeros_like(crossfit[0])
    within: est.Selection = "none" if selection == "none" else "same"
    for fold in range(int(folds.max()) + 1):
        rows = folds == fold
        sub = _corrected(stack[:, rows], names, None if cv is None else cv[:, rows], curves.weight[rows], cv_bins[rows])
        own[rows] = est.chosen(sub, _choice(sub, names, torch.zeros_like(folds[rows]), within, select_bins[rows], rule))
    return est.chosen(crossfit, choice), own


def _corrected(
    stack: Tensor, names: tuple[str, ...], cv: Tensor | None, weight: Tensor, bins: Tensor, folds: Tensor | None = None
) -> Tensor:
    """Each noisy candidate's errors minus its control variates, slopes crossfit over `folds` or else in-sample."""
    if cv is None:
        return stack
    fitted = []
    for name, e in zip(names, stack, strict=True):
        if name in EXACT:
            fitted.append(e)
        elif folds is None:
            fitted.append(est.control_variate_in_sample(e, cv, weight, bins))
        else:
            fitted.append(est.control_variate(e, cv, weight, bins, folds))
    return torch.stack(fitted)


def _choice(
    stack: Tensor, names: tuple[str, ...], folds: Tensor, selection: est.Selection, bins: Tensor, rule: Rule
) -> Tensor:
    """Per cell, the chosen candidate: by `selection` over these cells, or by the rule's separate selection means."""
    if rule.select_means is None:
        return est.choose(stack, folds, selection, bins)
    means = torch.stack([rule.select_means[n] for n in names])
    return means.argmin(0).expand(stack.shape[1], -1).clone()


def _controls(curves: Curves, kind: str) -> Tensor | None:
    """The kind's control variates (C, N, J): the Gaussian denoiser's error, then the noise moments, where recorded."""
    names = (CONTROL[kind], *controls.NAMES)
    found = [curves.errors[n] for n in names if n in curves.errors]
    return torch.stack(found) if found else None


def _curve_control(curves: Curves, proposal: Proposal, folds: Tensor, own: Tensor | None) -> est.CurveControl | None:
    """The crossfit mean-curve control on knots at the proposal's quantiles, one interval per CURVE_CELLS cells.

    None without control variates, or with cells for fewer than MIN_CURVE_KNOTS intervals: so coarse a curve
    adds more variance than it removes (benchmarks/curve_control.py).
    """
    intervals = min(CURVE_KNOTS, curves.logsnr.numel() // (2 * CURVE_CELLS))
    if own is None or intervals < MIN_CURVE_KNOTS:
        return None
    knots = proposal.icdf(torch.linspace(0, 1, intervals + 1, dtype=torch.float64))
    knots[0], knots[-1] = proposal.logsnr_min, proposal.logsnr_max
    return est.CurveControl(curves.logsnr, curves.weight, folds, knots, own)


def _bins(curves: Curves, proposal: Proposal, count: int) -> Tensor:
    """Each cell's logSNR bin, by `count` quantiles of the proposal (for the choice and the control variate)."""
    edges = proposal.icdf(torch.linspace(0, 1, count + 1, dtype=torch.float64))[1:-1]
    return torch.bucketize(curves.logsnr.contiguous(), edges)


def score(
    curves: Curves,
    ref: GaussianReference,
    values: Tensor,
    proposal: Proposal,
    levels: int | None,
    names: list[str],
    selection: est.Selection,
    seed: int,
    rule: Rule | None = None,
) -> Scores:
    """Every requested estimator from one set of curves; `values` are the scored images on the model scale."""
    rule = rule or Rule()
    out = Scores()
    folds = est.crossfit_folds(len(curves.index), 2, torch.Generator().manual_seed(seed + 1))
    mmse_g = ref.mmse(curves.logsnr)
    w, groups = curves.weight, curves.groups
    if "continuous" in names or "continuous_pointwise" in names:
        e, own = _pick(curves, "continuous", folds, selection, out, rule, proposal)
        curve = _curve_control(curves, proposal, folds, own)
        out.estimates["continuous"] = est.nll_continuous(ref.entropy(), mmse_g, w, e, groups, curve)
        gauss = curves.errors["gauss"]
        pointwise = est.nll_continuous_pointwise(ref.nll(values), gauss, w, e, groups, curve)
        out.estimates["continuous_pointwise"] = pointwise
        out.integrands["continuous"] = 0.5 * (gauss - e)
    if "discrete" in names and levels:
        e, own = _pick(curves, "discrete", folds, selection, out, rule, proposal)
        curve = _curve_control(curves, proposal, folds, own)
        left = ref.left_tail(proposal.logsnr_min, ref.whiten(values))
        right = est.right_tail(proposal.logsnr_max, ref.dim, levels)
        out.estimates["discrete"] = est.nll_discrete(left, right, w, e, groups, curve)
        out.integrands["discrete"] = 0.5 * e
    if "dequantized" in names and levels:
        e, own = _pick(curves, "dequantized", folds, selection, out, rule, proposal)
        curve = _curve_control(curves, proposal, folds, own)
        deq = est.nll_dequantized(ref.entropy(), mmse_g, w, e, groups, ref.dim, levels, curve)
        out.estimates["dequantized"] = deq
        out.integrands["dequantized"] = 0.5 * (curves.errors["gauss_deq"] - e)
    out.warnings = _edge_warnings(out.integrands, curves.logsnr, proposal, ref.dim, levels)
    return out


def _edge_warnings(
    integrands: dict[str, Tensor], logsnr: Tensor, proposal: Proposal, dim: int, levels: int | None
) -> list[str]:
    """Warn where an integrand (bpd per unit logSNR) is still large at an end of the range."""
    warnings = []
    for kind, values in integrands.items():
        ends = {
            "left": (_end_mean(values, logsnr, proposal, "left") / (dim * math.log(2)), proposal.logsnr_min),
            "right": (_end_mean(values, logsnr, proposal, "right") / (dim * math.log(2)), proposal.logsnr_max),
        }
        if kind == "discrete":
            ends.pop("left")  # the left tail is added in closed form
        for side, (value, at) in ends.items():
            if abs(value) > EDGE_TOLERANCE_BPD:
                warnings.append(_edge_message(kind, side, value, at, levels))
    return warnings


def _end_mean(values: Tensor, logsnr: Tensor, proposal: Proposal, side: str) -> float:
    """Mean integrand over the cells within EDGE_WINDOW of the range's width from one end (else its outer column).

    A whole column can span much of the range where the proposal puts little mass there (an adaptive one),
    so the cells are taken by their logSNR.
    """
    reach = EDGE_WINDOW * (proposal.logsnr_max - proposal.logsnr_min)
    near = logsnr <= proposal.logsnr_min + reach if side == "left" else logsnr >= proposal.logsnr_max - reach
    if bool(near.any()):
        return float(values[near].to(torch.float64).mean())
    return float(est.column_means(values)[0 if side == "left" else -1])


def _edge_message(kind: str, side: str, value: float, at: float, levels: int | None) -> str:
    """One warning line for an integrand that has not decayed at one end."""
    flag = "--logsnr-min" if side == "left" else "--logsnr-max"
    text = (
        f"{kind}: the integrand is still {value:+.3f} bpd per unit logSNR at the {side} end (logSNR {at:.2f}); "
        f"the range may cut off real mass, widen it with {flag}"
    )
    if kind == "continuous" and side == "right" and levels:
        text += (
            " (on discrete data the continuous density keeps falling as the upper end rises: report it with the range)"
        )
    return text
