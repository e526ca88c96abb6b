"""Rendering: progress on stderr, tables on stdout (rich)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from itdcli.api.results import NllResult

console = Console(soft_wrap=True)
err_console = Console(stderr=True)


class Bar:
    """A transient rich bar on stderr started at the first update (so early errors print no bar), redrawn ≤ 10/s.

    Called as update(done, total); total 0 means unknown. `stage(label, unit)` starts the bar over for the
    next stage of a run (the ODE after the I-MMSE points), with its own units and rate.
    """

    def __init__(self, label: str, columns: tuple[ProgressColumn, ...], rate: bool, unit: str) -> None:
        """An unstarted bar."""
        self.bar = Progress(*columns, console=err_console, transient=True, auto_refresh=False)
        self.task = self.bar.add_task(label, total=None, rate="-", unit=unit)
        self.rate, self.last = rate, 0.0

    def __call__(self, done: int, total: int) -> None:
        """Show `done` of `total`, with the rate when the bar has one."""
        if not self.bar.live.is_started:
            self.bar.start()
        speed = self.bar.tasks[0].speed if self.rate else None
        self.bar.update(self.task, completed=done, total=total or None, rate=f"{speed:,.0f}" if speed else "-")
        if time.monotonic() - self.last > 0.1 or done == total:
            self.bar.refresh()
            self.last = time.monotonic()

    def stage(self, label: str, unit: str) -> None:
        """Start over for the next stage, counted in `unit`."""
        self.bar.reset(self.task, total=None, completed=0, description=label, rate="-", unit=unit)


@contextlib.contextmanager
def lazy_progress(label: str, columns: tuple[ProgressColumn, ...], rate: bool, unit: str = "points") -> Iterator[Bar]:
    """A `Bar` for the duration of a command, stopped (and erased) at the end."""
    bar = Bar(label, columns, rate, unit)
    try:
        yield bar
    finally:
        bar.bar.stop()


def progress_bar(label: str) -> contextlib.AbstractContextManager[Bar]:
    """The bar of nll, curve and ensemble: points (or a solver's own units) per second and ETA."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]} {task.fields[unit]}/s"),
        TimeRemainingColumn(),
    )
    return lazy_progress(label, columns, rate=True)


def _pm(value: float, se: float | None) -> str:
    """`value ± se` with four decimals."""
    return f"{value:.4f}" if se is None else f"{value:.4f} ± {se:.4f}"


def _tails(result: NllResult) -> str:
    """The closed-form tails outside the range, in bpd: the left one (shared) and each estimator's right one."""
    if not result.tails:
        return ""
    first = next(iter(result.tails.values()))
    right = ", ".join(f"{name} {t.right_bpd:.4f}" for name, t in result.tails.items())
    return f", tails in bpd: left {first.left_bpd:.4f}, right {right} (limit {first.limit_bpd:.4f} each)"


def print_nll(result: NllResult) -> None:
    """The table of bits/dim per estimator, evaluations and time, then where the run was saved."""
    d = result.data
    points = f", {result.points} logSNR points each" if result.points else ""
    title = f"{result.model} on {d.name} ({d.n_images} images{points})"
    if result.bound == "paper-clamp":
        title += "; paper clamp: switches to N(μ,Σ) per logSNR (an ensemble, not the model's own bound)"
    table = Table(title=title, title_justify="left")
    table.add_column("estimator")
    table.add_column("bits/dim", justify="right")
    table.add_column("nats/image", justify="right")
    table.add_column("± over images", justify="right")
    if result.solvers:
        table.add_column("evals/image", justify="right")
        table.add_column("seconds", justify="right")
    for name, e in result.estimates.items():
        spread = "" if e.sampling_stderr_bpd is None else f"{e.sampling_stderr_bpd:.4f}"
        row = [name, _pm(e.bpd, e.stderr_bpd), _pm(e.nats, e.stderr_nats), spread]
        if result.solvers:
            own = result.solvers.get(name)
            row += [f"{own.evals_per_image:,.0f}", f"{own.seconds:.1f}"] if own else ["I-MMSE", "I-MMSE"]
        table.add_row(*row)
    console.print(table)
    for name, info in result.solvers.items():
        said = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in info.details.items())
        console.print(f"{name}: {said}", highlight=False)
    p = result.proposal
    rounds = f" in {result.rounds} rounds" if result.rounds > 1 else ""
    aims = [f"± {result.target_stderr_bpd:g}"] if result.target_stderr_bpd else []
    aims += [f"± {result.target_image_stderr_bpd:g} per image"] if result.target_image_stderr_bpd else []
    target = f" (target {', '.join(aims)})" if aims else ""
    if not result.points:  # solver estimators alone: no I-MMSE pass ran
        console.print(f"logSNR range [{p.logsnr_min:.3f}, {p.logsnr_max:.3f}]; on {result.device}", highlight=False)
    else:
        _footer(result, rounds, target)
    for line in result.notes:
        console.print(f"note: {line}", highlight=False)
    if result.run_dir:
        console.print(f"saved run: {result.run_dir}", highlight=False)


def _footer(result: NllResult, rounds: str, target: str) -> None:
    """The I-MMSE passes' range, tails, proposal, evaluations and time."""
    p = result.proposal
    console.print(
        f"logSNR range [{p.logsnr_min:.3f}, {p.logsnr_max:.3f}]{_tails(result)}; {p.kind} proposal "
        f"(loc {p.loc:.3f}, scale {p.scale:.3f}); {result.evals_per_image:.1f} network evaluations per image"
        f"{rounds}{target}, pilot included; {result.seconds:.1f} s on {result.device}",
        highlight=False,
    )
