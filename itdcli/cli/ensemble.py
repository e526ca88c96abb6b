"""`itd ensemble DATA --model A --model B`: per-logSNR choice among models, scored on held-out selection."""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from itdcli.cli import _options as o
from itdcli.cli._render import console, progress_bar


def ensemble_command(
    data: Annotated[str, typer.Argument(metavar="DATA", help="Dataset to score (as for itd nll).")],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="A member model; repeat.")] = None,
    run: Annotated[list[Path] | None, typer.Option("--run", help="A saved itd nll run to use as a member.")] = None,
    select_on: Annotated[str | None, typer.Option(help="Choose per logSNR on this data instead.")] = None,
    select_fraction: Annotated[
        float | None, typer.Option(help="Choose on this random fraction of DATA, score the rest.")
    ] = None,
    estimator: Annotated[str | None, typer.Option(help="continuous, discrete, dequantized or all.")] = None,
    points: o.PointsOpt = 100,
    seed: o.SeedOpt = 0,
    batch_size: o.BatchOpt = None,
    device: o.DeviceOpt = "auto",
    limit: o.LimitOpt = None,
    reference: o.ReferenceOpt = None,
    out: o.OutDirOpt = None,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = False,
) -> None:
    """Combine models per logSNR into one ensemble's bound, named as one (add --model gaussian for N(μ,Σ))."""
    from itdcli.api.ensemble import ensemble

    shared: dict[str, Any] = {"points": points, "seed": seed, "batch_size": batch_size, "device": device}
    shared.update({"limit": limit, "estimator": estimator})
    with progress_bar("ensemble") as advance:
        result = ensemble(
            data,
            model or [],
            runs=run or [],
            reference=reference,
            select_on=select_on,
            select_fraction=select_fraction,
            out=out,
            overwrite=overwrite,
            progress=advance,
            **{k: v for k, v in shared.items() if v is not None},
        )
    if json_out:
        typer.echo(result.model_dump_json(indent=2))
        return
    table = Table(title=f"ensemble on {result.data} (bits/dim ± standard error)", title_justify="left")
    table.add_column("estimator")
    for name in [*result.members, "ensemble"]:
        table.add_column(name, justify="right")
    for est, e in result.ensemble.items():
        cells = [f"{m[est].bpd:.4f} ± {m[est].stderr_bpd or 0:.4f}" for m in result.members.values()]
        table.add_row(est, *cells, f"[bold]{e.bpd:.4f} ± {e.stderr_bpd or 0:.4f}[/]")
    console.print(table)
    for est, spans in result.winners.items():
        text = ", ".join(f"[{s.logsnr_from:.2f}, {s.logsnr_to:.2f}] {s.member}" for s in spans)
        console.print(f"{est} winners: {text}", highlight=False)
    console.print(f"selection: {result.selection}; saved: {result.run_dir}", highlight=False)
