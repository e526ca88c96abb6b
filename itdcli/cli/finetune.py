"""`itd finetune --model M --data D --out DIR`: train with the information-theoretic objective."""

from pathlib import Path
from typing import Annotated, Any

import typer

from itdcli.cli import _options as o
from itdcli.cli._render import console, err_console


def _echo(entry: dict[str, Any]) -> None:
    """One console line per metrics entry, on stderr."""
    if "eval" in entry:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in entry["eval"].items())
        err_console.print(f"step {entry['step']:>7}  eval  {scores}", highlight=False)
    else:
        err_console.print(f"step {entry['step']:>7}  train ITD loss {entry['loss_bpd']:.4f} bits/dim", highlight=False)


def finetune_command(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run folder: checkpoint/, metrics.jsonl, metrics.png (default: a new folder under the itd home's "
            "runs/; needed for --resume).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model to fine-tune (name, path, itd run); required unless --init scratch."),
    ] = None,
    data: Annotated[str, typer.Option("--data", "-d", help="Training data.")] = "digits_train",
    preset: Annotated[str | None, typer.Option(help="paper-iddpm or paper-ddpm: the paper's settings.")] = None,
    init: Annotated[str, typer.Option(help="pretrained (the --model's weights) or scratch (--arch).")] = "pretrained",
    arch: Annotated[str | None, typer.Option(help="New network for --init scratch, e.g. iddpm:channels=32,...")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default 1 unless --steps).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimisation steps (overrides --epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 1e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Global batch size (default 64).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam (the paper's) or adamw.")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default 0).")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay; 0 turns EMA off (default 0.999).")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Gradient-norm clip; 0 turns it off (default 1).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 autocast on CUDA.")] = "fp32",
    seed: o.SeedOpt = 0,
    device: o.DeviceOpt = "auto",
    eval_data: Annotated[str | None, typer.Option(help="Data for periodic evaluation (nll estimators).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps (default: at the end).")] = None,
    eval_points: Annotated[int, typer.Option(help="logSNR points per image in evaluations.")] = 16,
    eval_limit: Annotated[int | None, typer.Option(help="Evaluate on a seeded subset of this many images.")] = None,
    log_every: Annotated[int, typer.Option(help="Log the training loss every N steps.")] = 10,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps (default: every epoch).")] = None,
    logsnr_min: Annotated[float | None, typer.Option(help="Lower end of the training logSNR range.")] = None,
    logsnr_max: Annotated[float | None, typer.Option(help="Upper end of the training logSNR range.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly.")] = False,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = False,
) -> None:
    """Fine-tune (or train from scratch) with the ITD loss; checkpoints are safetensors + JSON, resumable."""
    from itdcli import runtime
    from itdcli.api.finetune import finetune

    fields = {
        "out": out,
        "preset": preset,
        "init": init,
        "arch": arch,
        "epochs": epochs,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "weight_decay": weight_decay,
        "ema_decay": ema_decay,
        "grad_clip": grad_clip,
        "precision": precision,
        "seed": seed,
        "device": device,
        "eval_data": eval_data,
        "eval_every": eval_every,
        "eval_points": eval_points,
        "eval_limit": eval_limit,
        "log_every": log_every,
        "save_every": save_every,
        "logsnr_min": logsnr_min,
        "logsnr_max": logsnr_max,
        "resume": resume,
        "overwrite": overwrite,
    }
    result = finetune(
        model, data, log=None if json_out else _echo, **{k: v for k, v in fields.items() if v is not None}
    )
    if not runtime.is_main():
        return
    if json_out:
        typer.echo(result.model_dump_json(indent=2))
        return
    console.print(
        f"trained {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.1f} s", highlight=False
    )
    for name, value in result.eval.items():
        console.print(f"  eval {name}: {value:.4f} bits/dim", highlight=False)
    folder = Path(result.out)
    console.print(f"model: {folder} (use --model {folder}); metrics: {folder / 'metrics.jsonl'}", highlight=False)
