"""`itdcli.ensemble`: per-logSNR choice among several denoisers for a tighter likelihood (spec §9).

Every member is evaluated on the same images with the same logSNR points and noise (each image's draws depend
only on the seed and its index), and the choice per logSNR bin is made on selection data that is never the data
being scored: the other crossfit fold (default), a held-out fraction of DATA, or separate data (`select_on`).
The Gaussian reference is a member only when asked for (`--model gaussian`), so a one-model ensemble is its model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from itdcli.api import records
from itdcli.api.results import EstimateResult, NllResult
from itdcli.errors import ItdError

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_POINTS = 100


class Interval(BaseModel):
    """A logSNR interval on which one member wins the selection."""

    logsnr_from: float
    logsnr_to: float
    member: str


class EnsembleResult(BaseModel):
    """The ensemble's estimates beside each member's, the winners per logSNR interval, and where it was saved."""

    schema_version: str = "itd.ensemble/1"
    data: str
    members: dict[str, dict[str, EstimateResult]]
    ensemble: dict[str, EstimateResult]
    winners: dict[str, list[Interval]]
    selection: str
    points: int
    seed: int
    run_dir: str | None = None
    member_runs: list[str] = Field(default_factory=list)
    arrays: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)


def _check_compatible(results: Sequence[NllResult]) -> None:
    """Members must share data, images, points, seed and proposal, i.e. the same logSNR points and noise."""
    first = results[0]
    for r in results[1:]:
        same = (
            r.data.sha256 == first.data.sha256
            and (r.points, r.seed, r.proposal) == (first.points, first.seed, first.proposal)
            and torch.equal(r.arrays["index"], first.arrays["index"])
            and torch.equal(r.arrays["logsnr"], first.arrays["logsnr"])
        )
        if not same:
            raise ItdError(
                f"runs of '{first.model}' and '{r.model}' do not share data, points, seed and logSNR range: "
                "rerun them with the same itd nll options and --points N --no-adapt, or let itd ensemble compute them"
            )
    for r in results:
        if "deq/logsnr" in r.arrays:
            raise ItdError(
                f"the run of '{r.model}' gave its dequantized estimator points of its own (its own proposal "
                "or rounds): rerun it with --points N --no-adapt, or let itd ensemble compute it"
            )


def _labels(results: Sequence[NllResult]) -> list[str]:
    """Member names, made unique."""
    names: list[str] = []
    for r in results:
        name = Path(r.model).name or r.model
        names.append(name if name not in names else f"{name}#{len(names)}")
    return names


def _merged(results: Sequence[NllResult], labels: Sequence[str]) -> tuple[Any, dict[str, tuple[Any, ...]]]:
    """One set of curves holding every member's errors and the Gaussian's, with candidates per estimator family."""
    from dataclasses import replace

    from itdcli.evaluation import cellerrors, units
    from itdcli.evaluation.engine import Curves

    each = [Curves.from_arrays(r.arrays) for r in results]  # the same images, points and noise for every member
    errors = cellerrors.merged({label: c.errors for label, c in zip(labels, each, strict=True)})
    candidates = {
        u.family: tuple(
            c for lab in labels for k in u.candidates if errors.error(c := cellerrors.Candidate(k, lab)) is not None
        )
        for u in units.UNITS.values()
    }
    return replace(each[0], errors=errors), candidates


def _select_means(curves: Any, rows: torch.Tensor) -> dict[Any, torch.Tensor]:
    """Mean error per point column of every recorded candidate over the selection images `rows`."""
    return {c: e[rows].mean(0) for c, e in curves.errors.candidates()}


def _winners(curves: Any, proposal: Any, scores: Any) -> dict[str, list[Interval]]:
    """Per estimator family, the member whose errors the scored cells were given, as logSNR intervals."""
    from itdcli.evaluation.scoring import winners

    table: dict[str, list[Interval]] = {}
    for family, choice in scores.choice.items():
        members = [c.member for c in scores.candidates[family]]
        table[family] = [
            Interval(logsnr_from=lo, logsnr_to=hi, member=member)
            for lo, hi, member in winners(curves, proposal, choice, members)
        ]
    return table


def ensemble(
    data: Any,
    models: Sequence[Any] = (),
    *,
    runs: Sequence[str | Path] = (),
    reference: Any = None,
    select_on: Any = None,
    select_fraction: float | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    save: bool = True,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> EnsembleResult:
    """Combine models per logSNR on `data`; `options` are `itd nll` options shared by every member.

    Members are computed from `models` (names, paths, callables) and/or taken from saved `runs` of `itd nll`.
    """
    from itdcli.api.nll import _estimate_result, nll, resolve_reference
    from itdcli.core.proposal import Proposal
    from itdcli.data import load_data
    from itdcli.evaluation.scoring import Rule, score
    from itdcli.evaluation.units import Inputs

    with records.claimed_out(out, overwrite) as out:  # held until the ensemble is written
        _check_members(models, runs, select_on, select_fraction)
        # members must share every logSNR point: a fixed budget and the base proposal (no per-model pilot)
        member_opts = {**options, "save": False, "adapt": False, "points": options.get("points") or ENSEMBLE_POINTS}
        results = [records.read_run(Path(r)) for r in runs]
        results += [nll(data, m, reference=reference, progress=progress, **member_opts) for m in models]
        _check_compatible(results)
        labels = _labels(results)
        curves, candidates = _merged(results, labels)
        first = results[0]
        dataset = load_data(data, levels=first.data.levels)
        ref = resolve_reference(reference, dataset).ref
        p = first.proposal
        proposal = Proposal(p.kind, p.loc, p.scale, p.logsnr_min, p.logsnr_max, tuple(p.edges), tuple(p.mass))  # type: ignore[arg-type]
        selection_curves = None
        if select_on is not None:
            selection_curves, _ = _merged(
                [nll(select_on, m, reference=reference, **member_opts) for m in models], labels
            )
        means, rows, mode = _selection(curves, selection_curves, select_on, select_fraction, first.seed)
        scored = curves.rows(rows)
        codes = dataset.x[scored.index] if dataset.levels else None
        inp = Inputs(ref, dataset.values(scored.index), codes, dataset.levels, p.logsnr_min, p.logsnr_max)
        names = list(first.estimates)
        rule = Rule(candidates, means, control=options.get("control_variate", True))
        scores = score(scored, inp, proposal, names, "crossfit", first.seed, rule)
        dim = dataset.dim
        result = EnsembleResult(
            data=first.data.name,
            members={lab: r.estimates for lab, r in zip(labels, results, strict=True)},
            ensemble={n: _estimate_result(scores.estimates[n], dim) for n in names},
            winners=_winners(scored, proposal, scores),
            selection=mode,
            points=first.points,
            seed=first.seed,
            arrays={f"ensemble/{k}": v.float() for k, v in _chosen(scored, scores).items()},
        )
        if save:
            _write(result, results, labels, out or records.new_run_dir("ensemble", first.data.name))
        return result


def _check_members(
    models: Sequence[Any], runs: Sequence[str | Path], select_on: Any, select_fraction: float | None
) -> None:
    """Refuse, in one line each, member and selection options that cannot go together."""
    if select_on is not None and select_fraction is not None:
        raise ItdError("give either --select-on or --select-fraction, not both")
    if select_fraction is not None and not 0 < select_fraction < 1:
        raise ItdError(f"--select-fraction must lie strictly between 0 and 1, got {select_fraction}")
    if not models and not runs:
        raise ItdError(
            "give at least one --model or saved run to combine (add --model gaussian for the N(μ,Σ) reference)"
        )
    if select_on is not None and runs:
        raise ItdError("--select-on re-evaluates the members on other data: give them as --model, not as saved --run")


def _selection(
    curves: Any, selection_curves: Any, select_on: Any, select_fraction: float | None, seed: int
) -> tuple[dict[Any, torch.Tensor] | None, torch.Tensor, str]:
    """Where the per-logSNR choice is made: other data, a held-out share of the images, or crossfit.

    Returns the choice's mean errors (None for crossfit, which makes its own), the rows to score and the mode.
    """
    rows = torch.arange(curves.logsnr.shape[0])
    if selection_curves is not None:
        every = torch.arange(selection_curves.logsnr.shape[0])
        return _select_means(selection_curves, every), rows, f"select-on {select_on}"
    if select_fraction is not None:
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 2))
        cut = max(1, round(select_fraction * len(rows)))
        return _select_means(curves, perm[:cut]), perm[cut:].sort().values, f"held-out fraction {select_fraction}"
    return None, rows, "crossfit (two folds: each half is scored with the choice made on the other half)"


def _chosen(curves: Any, scores: Any) -> dict[str, torch.Tensor]:
    """The chosen candidate's error in every scored cell, per estimator, plus the cells' logSNR."""
    from itdcli.core import estimators as est

    out = {"logsnr": curves.logsnr}
    for kind, choice in scores.choice.items():
        out[kind] = est.chosen(curves.errors.stack(scores.candidates[kind]), choice)
    return out


def _write(result: EnsembleResult, members: Sequence[NllResult], labels: Sequence[str], out: Path) -> None:
    """ensemble.json, arrays.safetensors and every member's run under members/, written as one folder."""
    from safetensors.torch import save_file

    result.run_dir = str(out.resolve())
    result.member_runs = [str(out.resolve() / "members" / lab) for lab in labels]
    with records.atomic_folder(out) as tmp:
        for lab, r in zip(labels, members, strict=True):
            r.run_dir = str(out.resolve() / "members" / lab)
            records.write_run(r, tmp / "members" / lab, remember=False)
        save_file({k: v.contiguous() for k, v in result.arrays.items()}, str(tmp / records.ARRAYS_FILE))
        (tmp / ENSEMBLE_FILE).write_text(result.model_dump_json(indent=2) + "\n")
    records.remember_latest(out.resolve())


def read_ensemble(folder: Path) -> tuple[EnsembleResult, list[NllResult]]:
    """An ensemble folder: its result with arrays, and its members' runs."""
    from safetensors.torch import load_file

    result = EnsembleResult.model_validate(json.loads((folder / ENSEMBLE_FILE).read_text()))
    result.arrays = dict(load_file(str(folder / records.ARRAYS_FILE)))
    members = sorted((folder / "members").iterdir())
    return result, [records.read_run(m) for m in members]
