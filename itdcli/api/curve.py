"""`itdcli.curve`: the ε-MSE versus logSNR figure, from saved runs or by computing them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from itdcli.api import records
from itdcli.api.results import CurveResult, NllResult
from itdcli.errors import ItdError

FORMATS = (".pdf", ".png", ".svg")


def _check_figure_path(out: Path, overwrite: bool) -> Path:
    """A supported suffix, not an existing file unless `overwrite` (and then one itd drew), in a writable folder."""
    from itdcli import outputs
    from itdcli.plot import FIGURE_MARK

    if out.suffix.lower() not in FORMATS:
        raise ItdError(f"cannot tell the figure format of '{out}': end --out with .pdf, .png or .svg")
    if out.exists() and not overwrite:
        raise ItdError(f"'{out}' already exists: choose another --out or pass --overwrite to replace it")
    if out.is_dir():
        raise ItdError(f"'{out}' is a folder: give --out a file name ending in .pdf, .png or .svg")
    if out.exists() and FIGURE_MARK.encode() not in out.read_bytes()[: 64 * 2**20]:
        raise ItdError(
            f"'{out}' was not drawn by itd curve: --overwrite replaces only itd's own figures; choose another --out"
        )
    return outputs.check(out, "--out")


def _gather(
    runs: Sequence[str | Path | NllResult], model: Any, data: Any, compute: Callable[[], NllResult]
) -> list[NllResult]:
    """Saved runs as given, plus a freshly computed one for --model/--data, else the latest run."""
    if (model is None) != (data is None):
        raise ItdError("give both --model and --data to compute a curve, or neither to draw saved runs")
    results = [r if isinstance(r, NllResult) else records.read_run(Path(r)) for r in runs]
    if model is not None:
        results.append(compute())
    if not results:
        results.append(records.read_run(records.latest_run()))
    return results


def curve(
    runs: Sequence[str | Path | NllResult] = (),
    *,
    out: str | Path,
    model: Any = None,
    data: Any = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **nll_options: Any,
) -> CurveResult:
    """Draw ε-MSE against logSNR for each run, with the references; write `out` (.pdf, .png, .svg) atomically."""
    from itdcli import outputs

    out = _check_figure_path(Path(out), overwrite)
    with outputs.claim(out, "--out"):
        return _draw(runs, out, model, data, progress, nll_options)


def _draw(
    runs: Sequence[str | Path | NllResult],
    out: Path,
    model: Any,
    data: Any,
    progress: Callable[[int, int], None] | None,
    nll_options: dict[str, Any],
) -> CurveResult:
    """The body of `curve`, run while the figure's location is held."""
    import torch

    from itdcli import outputs, plot
    from itdcli.api.ensemble import ENSEMBLE_FILE, read_ensemble
    from itdcli.api.nll import nll

    plain: list[str | Path | NllResult] = []
    shade: list[tuple[plot.Series, plot.Series]] = []
    for r in runs:
        if not isinstance(r, NllResult) and (Path(r) / ENSEMBLE_FILE).exists():
            ens, members = read_ensemble(Path(r))
            plain += members
            shade += plot.ensemble_series(ens.arrays, members[0].arrays["eigvals"])
        else:
            plain.append(r)
    results = _gather(plain, model, data, lambda: nll(data, model, progress=progress, **nll_options))
    series: list[plot.Series] = []
    for r in results:
        if "logsnr" not in r.arrays and "vlb/logsnr" not in r.arrays:
            raise ItdError(f"run '{r.run_dir}' has no saved curves (arrays.safetensors): rerun itd nll with --out")
        label = r.model if len(results) == 1 else f"{r.model} · {r.data.name}"
        series += plot.run_series(label, r.arrays, int(torch.tensor(r.data.shape).prod()), r.data.levels is not None)
    lo = min(r.proposal.logsnr_min for r in results)
    hi = max(r.proposal.logsnr_max for r in results)
    series += plot.reference_series(results[0].arrays["eigvals"], lo, hi)
    title = ", ".join(sorted({r.data.name for r in results}))
    with outputs.atomic_file(out) as tmp:
        plot.draw(series, f"ε-MSE curves on {title}", tmp, shade)
    return CurveResult(
        path=str(out), runs=[r.run_dir or "<unsaved>" for r in results], series=[s.label for s in series]
    )
