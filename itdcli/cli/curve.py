"""`itd curve [RESULT_DIR ...] --out fig.pdf`: ε-MSE versus logSNR from saved runs or computed ones."""

from pathlib import Path
from typing import Annotated

import typer

from itdcli.cli import _options as o
from itdcli.cli._render import console, progress_bar


def curve_command(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(metavar="RUN_DIR", help="Run folders written by itd nll (default: the latest run)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure to write: .pdf, .png or .svg.")] = Path("curve.pdf"),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Compute a curve for this model.")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data to compute the curve on.")] = None,
    points: o.PointsOpt = 100,
    seed: o.SeedOpt = 0,
    limit: o.LimitOpt = None,
    device: o.DeviceOpt = "auto",
    reference: o.ReferenceOpt = None,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = False,
) -> None:
    """Draw ε-MSE against logSNR with the N(0,I) and N(μ,Σ) references (and rounded curves for discrete data)."""
    from itdcli.api.curve import curve

    options = {"points": points, "seed": seed, "limit": limit, "device": device}
    with progress_bar("curve") as advance:
        result = curve(
            runs or [],
            out=out,
            model=model,
            data=data,
            overwrite=overwrite,
            progress=advance,
            reference=reference,
            **options,
        )
    if json_out:
        typer.echo(result.model_dump_json(indent=2))
    else:
        drawn = ", ".join(result.runs)
        console.print(f"wrote {result.path} ({len(result.series)} curves) from {drawn}", highlight=False)
