"""A run of estimator units: an optional pilot that fits the proposal, then rounds of points to a target error.

Each image draws its own points per round; a pass (the network on x, on dequantized x) adds only the
points its own estimators still need, as 1/√points predicts (docs/math.md, Rounds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from itdcli import runtime
from itdcli.core.gaussian import GaussianReference
from itdcli.core.kinds import Selection
from itdcli.core.proposal import fit_adaptive
from itdcli.core.units import bits_per_dim
from itdcli.data import Dataset
from itdcli.errors import ItdError
from itdcli.evaluation import cellerrors, engine, scoring, units
from itdcli.models.base import Denoiser

MIN_ROUND_POINTS = 4  # two strata of two points
# SE ∝ J^(−α) for stratified points falls faster than i.i.d. points' J^(−1/2): finer strata also remove the
# integrand's trend; α measured on the digits default by benchmarks/rounds.py (0.543 discrete, 0.588 dequantized)
STRATIFIED_RATE, IID_RATE = 0.54, 0.5
MEMORY_SHARE = 0.8  # of the available memory a run may plan to use


@dataclass(frozen=True)
class Settings:
    """How the rounds aim and choose: targets (bpd), caps, pilot size, selection, control variates."""

    target: float | None
    image_target: float | None
    max_points: int
    pilot_images: int
    pilot_points: int
    seed: int
    selection: Selection
    control_variate: bool
    paper_clamp: bool = False


def subset(n: int, limit: int | None, seed: int) -> Tensor:
    """All image indices, or a seeded random subset of `limit` of them in index order (never just the first ones)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def inputs(dataset: Dataset, index: Tensor, ref: GaussianReference, plan: engine.Plan) -> units.Inputs:
    """The scored images and the range, as the units' exact terms and tails read them."""
    codes = dataset.x[index] if dataset.levels else None
    p = plan.proposal
    return units.Inputs(ref, dataset.values(index), codes, dataset.levels, p.logsnr_min, p.logsnr_max)


class Run:
    """The evaluation of the named estimators of one model on the images `index` of a dataset."""

    def __init__(
        self,
        net: Denoiser,
        dataset: Dataset,
        ref: GaussianReference,
        device: torch.device,
        index: Tensor,
        names: list[str],
        settings: Settings,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        """Hold the inputs; nothing is evaluated yet."""
        self.net, self.dataset, self.ref, self.device, self.index = net, dataset, ref, device, index
        self.names, self.settings, self.progress = names, settings, progress
        self.evals = self.pilot_evals = 0.0
        self.round_count = 0
        self.done = 0
        self.warnings: list[str] = []
        self._scored: dict[tuple[float, float], units.Inputs] = {}

    def inputs(self, plan: engine.Plan) -> units.Inputs:
        """The scored images' inputs on the plan's range, built once per range (not once per round)."""
        p = plan.proposal
        key = (p.logsnr_min, p.logsnr_max)
        if key not in self._scored:
            self._scored[key] = inputs(self.dataset, self.index, self.ref, plan)
        return self._scored[key]

    def _tick(self, n: int, total: int) -> None:
        """Progress in points of this rank, against the points planned so far."""
        self.done += n
        if self.progress is not None and runtime.is_main():
            self.progress(self.done, total)

    def _footprint(self, plan: engine.Plan, index: Tensor) -> engine.Footprint:
        """The memory a round of `plan` over this rank's share of `index` needs."""
        errors = sum(
            cellerrors.columns(units.PASS_ERRORS[p]) for p, on in (("main", plan.main), ("deq", plan.deq)) if on
        )
        return engine.footprint(plan, len(engine.local_rows(index)), self.dataset.dim, errors)

    def _shortfall(self, plan: engine.Plan, index: Tensor, held: int) -> tuple[int, int] | None:
        """(bytes needed, bytes available) when a round of `plan` beside `held` kept bytes does not fit, else None."""
        f = self._footprint(plan, index)
        host, device = runtime.host_memory_available(), runtime.device_memory_available(self.device)
        need = f.kept + held + (f.group if self.device.type != "cuda" else 0)
        fits = need <= MEMORY_SHARE * host and (self.device.type != "cuda" or f.group <= MEMORY_SHARE * device)
        return None if fits else (need if self.device.type != "cuda" else max(need, f.group), host)

    def check_first(self, plans: dict[str, engine.Plan]) -> None:
        """Refuse, before any work, a first round that cannot fit in memory, with the --points that would."""
        plan = next(iter(plans.values()))
        both = replace(plan, kinds=frozenset().union(*(p.kinds for p in plans.values())))
        short = self._shortfall(both, self.index, 0)
        if short is None:
            return
        fit = plan.points
        while fit > 1 and self._shortfall(replace(both, points=fit), self.index, 0) is not None:
            fit //= 2
        evals = engine.evals_per_image(both) * len(self.index)
        advice = (
            f"give --points {fit:,} or fewer, or --limit to score fewer images"
            if self._shortfall(replace(both, points=fit), self.index, 0) is None
            else "give --limit to score fewer images, or --batch-size to make the network's batches smaller"
        )
        raise ItdError(
            f"{len(self.index):,} images × {plan.points:,} points ({evals:,} network evaluations) would need about "
            f"{_gb(short[0])} of memory and {_gb(short[1])} is available: {advice}"
        )

    def _evaluate(self, plan: engine.Plan, index: Tensor) -> tuple[engine.Curves, int]:
        """One round of `plan` over `index`, counting network forwards and reporting progress."""
        total = self.done + len(engine.local_rows(index)) * plan.points
        curves = engine.evaluate(
            self.net, self.dataset, self.ref, plan, self.device, index, lambda n: self._tick(n, total)
        )
        return curves, engine.evals_per_image(plan) * len(index)

    def _rule(self, pilot: bool = False) -> scoring.Rule:
        """The scoring rule of the rounds; the pilot reads the model's own integrands without controls."""
        if pilot:
            return scoring.Rule(control=False)
        return scoring.Rule(control=self.settings.control_variate, paper_clamp=self.settings.paper_clamp)

    def plans(self, plan: engine.Plan) -> dict[str, engine.Plan]:
        """Each pass's plan: the network on x (continuous, discrete) and on dequantized x evaluate separately."""
        kinds = units.kinds(self.names)
        own = {"main": kinds - {"deq"}, "deq": kinds & {"deq"}}
        return {p: replace(plan, kinds=frozenset(own[p])) for p in self._passes()}

    def adapt(self, plans: dict[str, engine.Plan]) -> dict[str, engine.Plan]:
        """A pilot on a seeded subset of the data fits each pass's proposal to its integrands (forwards count).

        The passes run different networks inputs (x, dequantized x) whose integrands peak in different places,
        so each gets its own Neyman allocation.
        """
        s = self.settings
        first = next(iter(plans.values()))
        # pilot images are drawn from the whole dataset, so the proposal does not depend on --limit
        rows = subset(len(self.dataset), s.pilot_images, s.seed + 3)
        kinds = frozenset().union(*(p.kinds for p in plans.values()))
        pilot = replace(first, points=s.pilot_points, stream=engine.PILOT_STREAM, kinds=kinds)
        curves, evals = self._evaluate(pilot, rows)
        self.pilot_evals = self.evals = float(evals)
        inp = inputs(self.dataset, rows, self.ref, first)
        fitted = {}
        for p, names in self._passes().items():
            raw = scoring.score(curves, inp, first.proposal, names, "none", s.seed, self._rule(True))
            proposal = fit_adaptive(first.proposal, curves.logsnr, list(raw.integrands.values()))
            fitted[p] = replace(plans[p], proposal=proposal)
        return fitted

    def _passes(self) -> dict[str, list[str]]:
        """The estimators of each pass: the network on x (continuous, discrete), on dequantized x."""
        passes: dict[str, list[str]] = {"main": [], "deq": []}
        for u in units.units(self.names):
            passes["deq" if "deq" in u.kinds else "main"].append(u.name)
        return {p: names for p, names in passes.items() if names}

    def rounds(self, plans: dict[str, engine.Plan]) -> tuple[dict[str, engine.Curves], scoring.Scores]:
        """Rounds of points until every reported Monte Carlo standard error meets the target (or the cap).

        Each pass adds only the points its own estimators still need, so the dequantized pass (a second
        forward per point) stops as soon as its estimate is precise enough.
        """
        passes = self._passes()
        curves: dict[str, engine.Curves] = {}
        want = {p: plan.points for p, plan in plans.items()}
        while True:
            stream = self.round_count
            held = sum(
                self._footprint(replace(plans[p], points=int(c.logsnr.shape[1])), self.index).kept
                for p, c in curves.items()
            )
            short = [p for p, k in want.items() if self._shortfall(replace(plans[p], points=k), self.index, held)]
            if curves and short:
                done = max(int(c.logsnr.shape[1]) for c in curves.values())
                self.warnings.append(
                    f"stopped at {done:,} points per image, above the target error: the next round would not fit in "
                    f"memory ({_gb(runtime.host_memory_available())} available); give --limit to score fewer images"
                )
                return curves, self._score(curves, plans)
            for p, k in want.items():
                more, evals = self._evaluate(replace(plans[p], points=k, stream=stream), self.index)
                self.evals += evals
                more = more.subset(units.PASS_ERRORS[p].__contains__)
                curves[p] = more if p not in curves else curves[p].extended(more)
            self.round_count += 1
            scores = self._score(curves, plans)
            want = {p: self._next_round(scores, passes[p], plans[p], int(curves[p].logsnr.shape[1])) for p in passes}
            want = {p: k for p, k in want.items() if k > 0}
            if not want:
                return curves, scores

    def _score(self, curves: dict[str, engine.Curves], plans: dict[str, engine.Plan]) -> scoring.Scores:
        """Every estimator of every pass, scored on that pass's points and proposal."""
        passes = self._passes()
        merged = scoring.Scores()
        s = self.settings
        for p, c in curves.items():
            plan = plans[p]
            merged.merge(
                scoring.score(c, self.inputs(plan), plan.proposal, passes[p], s.selection, s.seed, self._rule())
            )
        return merged

    def _next_round(self, scores: scoring.Scores, names: list[str], plan: engine.Plan, done: int) -> int:
        """Points per image a pass adds next, as SE ∝ points^(−α) predicts for the targets; 0 once met or capped.

        The dataset target bounds each estimator's Monte Carlo standard error; the per-image target, the root
        mean square over images of their own errors (se/NAME). α is the scheme's rate (STRATIFIED_RATE, or
        1/2 for i.i.d. points), so a round lands near the target instead of past it; one that falls short is
        topped up. A round has at least MIN_ROUND_POINTS points, so that it stays stratified.
        """
        s = self.settings
        if (s.target is None and s.image_target is None) or done >= s.max_points:
            return 0
        dim = self.dataset.dim
        ratio = 0.0
        for e in (v for k, v in scores.estimates.items() if k.removesuffix("_paper_clamp") in names):
            if s.target is not None:
                ratio = max(ratio, bits_per_dim(e.stderr, dim) / s.target)
            if s.image_target is not None:
                per_image = math.sqrt(float(e.mc_var.clamp_min(0).mean()))
                ratio = max(ratio, bits_per_dim(per_image, dim) / s.image_target)
        if not ratio > 1:
            return 0
        rate = IID_RATE if plan.scheme == "iid" else STRATIFIED_RATE
        wanted = math.ceil(done * (math.pow(ratio, 1 / rate) - 1))
        return min(max(MIN_ROUND_POINTS, wanted + wanted % 2), s.max_points - done)


def _gb(size: float) -> str:
    """Bytes as gigabytes."""
    return f"{size / 1e9:,.1f} GB"
