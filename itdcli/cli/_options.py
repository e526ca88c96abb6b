"""Option aliases shared by the commands, as `Annotated` types (one definition per option)."""

from pathlib import Path
from typing import Annotated

import typer

from itdcli.core.kinds import MODEL_NAMES

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help=f"Model: {', '.join(MODEL_NAMES)}, a checkpoint path or folder, or module.path:attribute.",
    ),
]
ReferenceOpt = Annotated[
    str | None,
    typer.Option(
        help="Data for the Gaussian reference N(μ,Σ) (default: the family's training split), or standard-normal."
    ),
]
PointsOpt = Annotated[int, typer.Option(help="logSNR points per image, drawn from the proposal.")]
BudgetOpt = Annotated[
    int | None,
    typer.Option(
        "--points",
        help="A fixed budget of logSNR points per image (default: rounds of points until --target-stderr is met).",
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="Network precision: auto (the per-logSNR policy on CUDA, fp32 on CPU), policy, fp32 or bf16.",
    ),
]
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="Compile the network with torch.compile (CUDA graphs on GPU).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed for logSNR points, noise and subsets.")]
BatchOpt = Annotated[
    int | None,
    typer.Option("--batch-size", help="Network batch size in (image, logSNR) cells (default: by image size)."),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
LimitOpt = Annotated[
    int | None,
    typer.Option(help="Score a seeded random subset of this many images."),
]
OutDirOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Run folder to write (result.json, arrays.safetensors)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for machines).")]
LevelsOpt = Annotated[
    int | None,
    typer.Option(help="Grey levels of integer .npz data (default: 256 for uint8)."),
]
