"""`itdcli.finetune`: train a diffusion model with the information-theoretic objective (Kong et al. 2023, spec §8).

One logSNR per image from the run's proposal, uniform weighting in logSNR through the importance weight, the
MMSE gap to the Gaussian reference reported in bits/dim. Single process or torchrun (DDP); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from itdcli.errors import ItdError, ItdInterrupted, ItdOptionError

PRESETS: dict[str, dict[str, Any]] = {
    "paper-iddpm": {
        "optimizer": "adam",
        "lr": 2.5e-5,
        "batch_size": 32,
        "epochs": 10,
        "ema_decay": 0.0,
        "grad_clip": 0.0,
        "weight_decay": 0.0,
    },
    "paper-ddpm": {
        "optimizer": "adam",
        "lr": 1e-4,
        "batch_size": 64,
        "epochs": 10,
        "ema_decay": 0.0,
        "grad_clip": 0.0,
        "weight_decay": 0.0,
    },
}
METRICS = "metrics.jsonl"
TRAINER_STATE = "trainer.safetensors"
TRAINER_JSON = "trainer.json"


class FinetuneOptions(BaseModel):
    """Every setting of an `itd finetune` run; a preset fills in what is not given explicitly."""

    model_config = ConfigDict(extra="forbid")

    out: Path | None = None  # default: a new folder under the itd home's runs/
    preset: Literal["paper-iddpm", "paper-ddpm"] | None = None
    init: Literal["pretrained", "scratch"] = "pretrained"
    arch: str | None = None
    epochs: PositiveInt | None = None
    steps: PositiveInt | None = None
    lr: PositiveFloat = 1e-4
    batch_size: PositiveInt = 64
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = Field(0, ge=0)
    device: str = "auto"
    eval_data: str | None = None
    eval_every: PositiveInt | None = None
    eval_points: PositiveInt = 16
    eval_limit: PositiveInt | None = None
    log_every: PositiveInt = 10
    save_every: PositiveInt | None = None
    logsnr_min: float | None = None
    logsnr_max: float | None = None
    resume: bool = False
    overwrite: bool = False

    @property
    def folder(self) -> Path:
        """The run folder (`out`, which `finetune` always sets before training)."""
        if self.out is None:
            raise ItdOptionError("out", "no run folder was chosen: give --out DIR")
        return self.out

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        """Preset values fill every field the caller did not set."""
        if isinstance(values, dict) and values.get("preset") in PRESETS:
            return {**PRESETS[values["preset"]], **{k: v for k, v in values.items() if v is not None}}
        return values


class FinetuneResult(BaseModel):
    """Where the model was written, how far training went, and the last losses."""

    out: str
    steps: int
    epochs: float
    train_loss_bpd: float | None
    eval: dict[str, float] = Field(default_factory=dict)
    seconds: float
    plot: str | None = None


DEFAULT_ARCH = "iddpm:channels=32,res_blocks=2,mult=1-2,attn=2,heads=4,dropout=0.1"
_ARCH_KEYS = {
    "channels": "model_channels",
    "res_blocks": "num_res_blocks",
    "mult": "channel_mult",
    "attn": "attention_resolutions",
    "heads": "num_heads",
    "dropout": "dropout",
}


def parse_arch(spec: str, shape: tuple[int, ...]) -> Any:
    """`iddpm:channels=32,res_blocks=2,mult=1-2,attn=2,heads=4,dropout=0.1` → an IDDPMConfig for (C, H, W) images."""
    from itdcli.models.iddpm_unet import IDDPMConfig

    family, _, rest = spec.partition(":")
    if family != "iddpm" or len(shape) != 3 or shape[1] != shape[2]:
        raise ItdError(f"cannot build '{spec}' for images of shape {shape}: use iddpm:key=value,... on square images")
    fields: dict[str, Any] = {"image_size": shape[1], "in_channels": shape[0], "out_channels": shape[0]}
    defaults = DEFAULT_ARCH.partition(":")[2].split(",")  # keys not given take the default small network's values
    for item in filter(None, [*defaults, *rest.split(",")]):
        key, _, value = item.partition("=")
        if key not in _ARCH_KEYS:
            raise ItdError(f"unknown --arch key '{key}': use {', '.join(_ARCH_KEYS)}")
        try:
            parts = [float(v) if key == "dropout" else int(v) for v in value.split("-") if v not in ("", "none")]
        except ValueError as exc:
            raise ItdError(f"bad --arch value {key}={value}: give numbers joined by '-', e.g. mult=1-2") from exc
        fields[_ARCH_KEYS[key]] = tuple(parts) if key in ("mult", "attn") else parts[0]
    config = IDDPMConfig(**fields)
    config.check()
    return config


def _network(model: Any, opts: FinetuneOptions, shape: tuple[int, ...], proposal: Any, ref: Any) -> torch.nn.Module:
    """The network to train: built from --arch (scratch), rebuilt from the checkpoint (resume), or loaded."""
    from itdcli.models import checkpoints
    from itdcli.models.registry import load_model

    if opts.resume:
        folder = checkpoints.checkpoint_dir(opts.folder)
        if folder is None:
            raise ItdError(
                f"nothing to resume in '{opts.folder}': it holds no checkpoint (a run stopped before its first save "
                "leaves none); drop --resume to start again"
            )
        return checkpoints.build(checkpoints.read_description(folder))
    if opts.init == "scratch":
        from itdcli.models.iddpm import IDDPMDenoiser
        from itdcli.models.iddpm_unet import IDDPMUNet

        torch.manual_seed(opts.seed)
        denoiser = IDDPMDenoiser(IDDPMUNet(parse_arch(opts.arch or DEFAULT_ARCH, shape)), time_map="logsnr")
        denoiser.trained_logsnr = (proposal.logsnr_min, proposal.logsnr_max)
        return denoiser
    if model is None:
        raise ItdError("give --model to fine-tune, or --init scratch --arch ... to train a new network")
    loaded = load_model(model, ref)
    if not isinstance(loaded, torch.nn.Module) or getattr(loaded, "family", None) not in ("iddpm", "diffusers"):
        raise ItdError(
            f"model '{model}' cannot be fine-tuned: give an IDDPM checkpoint, a diffusers UNet or an itd run"
        )
    return loaded


FINETUNE_ENTRIES = frozenset({"checkpoint", METRICS, "metrics.png"})  # what a finetune folder holds


def _check_out(opts: FinetuneOptions) -> None:
    """Refuse an --out that holds another run unless --resume or --overwrite, and foreign files always.

    `--overwrite` restarts only a finetune folder: anything else in it is named and refused, never deleted.
    """
    out = opts.folder
    if not out.exists():
        return
    if not out.is_dir():
        raise ItdError(f"--out '{out}' is a file, not a folder: choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in FINETUNE_ENTRIES and not _stale(p.name))
    if opts.overwrite and foreign:
        raise ItdError(
            f"'{out}' holds '{foreign[0]}', which itd finetune did not write: --overwrite restarts only a finetune "
            "folder; choose another --out"
        )
    if opts.resume or opts.overwrite or not any(out.iterdir()):
        return
    if not foreign and not (out / "checkpoint").exists():  # a run stopped before its first checkpoint
        return
    raise ItdError(
        f"'{out}' already holds a run or other files: pass --resume to continue it or --overwrite to restart"
    )


def _stale(name: str) -> bool:
    """Whether `name` is a temporary entry an interrupted itd left (removed by the next writer)."""
    return name.startswith(".itd-tmp-")


def _metrics_log(out: Path, resume_step: int | None, echo: Callable[[dict[str, Any]], None] | None) -> Any:
    """A logger appending JSON lines to DIR/metrics.jsonl (rank 0), cut back to the resumed step."""
    from itdcli import runtime

    path = out / METRICS
    if runtime.is_main():
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None:
            kept = [entry for entry in _read_metrics(out) if entry["step"] <= resume_step]
        _replace_text(path, "".join(json.dumps(entry) + "\n" for entry in kept))

    def log(entry: dict[str, Any]) -> None:
        if runtime.is_main():
            with path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
            if echo is not None:
                echo(entry)

    return log


def _evaluator(opts: FinetuneOptions, setup: Any, state: Any, log: Callable[[dict[str, Any]], None]) -> Any:
    """Evaluation on --eval-data with the averaged network: the nll estimators and the ITD loss (spec §7.5)."""
    from itdcli import train
    from itdcli.api.nll import nll

    latest: dict[str, float] = {}

    def evaluate(step: int) -> None:
        if opts.eval_data is None:
            return
        network = train.averaged(setup, state)
        options: dict[str, Any] = {
            "points": opts.eval_points,
            "limit": opts.eval_limit,
            "seed": opts.seed,
            "device": str(setup.device),
            # the same points at every evaluation, float32, and the training network's memory format left alone
            "adapt": False,
            "precision": "fp32",
            "channels_last": False,
        }
        result = nll(opts.eval_data, network, save=False, **options)
        setup.denoiser.train()
        from itdcli.evaluation.engine import Curves

        c = Curves.from_arrays(result.arrays)
        model = c.errors.members[""].model
        if model is None:
            raise ItdError("the evaluation recorded no model errors: evaluate with a continuous or discrete estimator")
        gap = c.weight * (model - setup.ref.mmse(c.logsnr))
        dim = math.prod(result.data.shape) * math.log(2)
        latest.clear()
        latest.update({name: e.bpd for name, e in result.estimates.items()})
        latest["itd_loss"] = (setup.ref.entropy() + 0.5 * float(gap.mean())) / dim
        log({"step": step, "eval": dict(latest)})

    evaluate.latest = latest  # type: ignore[attr-defined]
    return evaluate


def finetune(
    model: Any = None,
    data: Any = "digits_train",
    *,
    log: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Train `model` on `data` with the ITD loss; `options` are the fields of `FinetuneOptions` (`out` required).

    `model` is anything `--model` accepts (IDDPM, diffusers, an itd run folder); with `init="scratch"` a new
    network is built from `arch`. `log(entry)` receives each metrics line as it is written to metrics.jsonl.
    """
    from itdcli import outputs, runtime
    from itdcli.api import records
    from itdcli.api.options import parse_as

    opts = parse_as(FinetuneOptions, options)
    if opts.out is None and opts.resume:
        raise ItdOptionError("out", "--resume needs --out DIR, the folder of the run to continue")
    if opts.out is None and runtime.distributed():
        raise ItdOptionError("out", "under torchrun give --out DIR, one folder that every process writes to")
    out = opts.out or records.new_run_dir(f"finetune-{model or opts.arch or 'scratch'}", str(data))
    opts = opts.model_copy(update={"out": out})
    _check_out(opts)
    opts = opts.model_copy(update={"out": outputs.check(out, "--out")})
    if not runtime.is_main():
        return _finetune(model, data, log, opts)
    with outputs.claim(opts.folder, "--out"):
        return _finetune(model, data, log, opts)


def _finetune(
    model: Any, data: Any, log: Callable[[dict[str, Any]], None] | None, opts: FinetuneOptions
) -> FinetuneResult:
    """The body of `finetune`, run while its output folder is held."""
    from itdcli import runtime, train
    from itdcli.api.nll import PAPER_CLIP, _check_input_shape, make_proposal, resolve_reference
    from itdcli.api.options import NllOptions
    from itdcli.data import load_data
    from itdcli.models import checkpoints

    if opts.overwrite and not opts.resume and runtime.is_main():
        shutil.rmtree(opts.folder / checkpoints.SUBFOLDER, ignore_errors=True)  # the user asked to start over
    device = runtime.local_device(opts.device)
    joined = runtime.init_distributed(device)
    if opts.precision == "bf16" and device.type != "cuda":
        raise ItdError("--precision bf16 needs a CUDA device; use --precision fp32 on the CPU")
    if opts.batch_size % runtime.world_size():
        raise ItdError(f"--batch-size {opts.batch_size} does not split over {runtime.world_size()} processes")
    dataset = load_data(data)
    resolved = resolve_reference(None, dataset)
    # training keeps the paper's range loc ± 4·scale (spec §8), not the evaluation's range from tails
    range_opts = NllOptions.model_validate(
        {"logsnr_min": opts.logsnr_min, "logsnr_max": opts.logsnr_max, "clip": PAPER_CLIP}
    )
    proposal = make_proposal(range_opts, resolved.spectrum, resolved.ref, ["continuous"], dataset.levels)
    denoiser = _network(model, opts, tuple(dataset.shape), proposal, resolved.ref)
    _check_input_shape(denoiser, dataset)
    denoiser.to(device)
    per_epoch = train.steps_per_epoch(len(dataset), opts.batch_size)
    total = opts.steps or (opts.epochs or 1) * per_epoch
    description = {
        **checkpoints.describe(denoiser),
        "data": {"name": dataset.name, "sha256": dataset.sha256, "levels": dataset.levels},
        "training": json.loads(opts.model_dump_json()),
        "model": model if isinstance(model, str) else None,
    }
    setup = train.Setup(
        denoiser,
        dataset.values().to(torch.float32),
        resolved.ref,
        proposal,
        device,
        opts.batch_size,
        total,
        opts.seed,
        opts.lr,
        opts.optimizer,
        opts.weight_decay,
        opts.ema_decay,
        opts.grad_clip,
        opts.precision == "bf16",
        description,
    )
    state = train.State(0, train.make_optimizer(setup), train.make_ema(setup))
    if opts.resume:
        train.restore(opts.folder, setup, state)
        if state.step > total:  # equal: the run is complete (e.g. it was stopped in its last step); it finishes
            raise ItdError(
                f"the checkpoint in '{opts.folder}' is at step {state.step}, beyond --steps {total}: nothing to "
                f"train; give a larger --steps to go on (e.g. --steps {state.step + total})"
            )
    logger = _metrics_log(opts.folder, state.step if opts.resume else None, log)
    evaluate = _evaluator(opts, setup, state, logger)
    every = {"log": opts.log_every, "eval": opts.eval_every, "save": opts.save_every or per_epoch}
    start = time.perf_counter()
    train.run(opts.folder, setup, state, every, logger, evaluate)
    if opts.eval_data is not None and not (opts.eval_every and state.step % opts.eval_every == 0):
        evaluate(state.step)
    try:
        plot = _plot(opts.folder) if runtime.is_main() else None
    except KeyboardInterrupt as exc:
        raise ItdInterrupted(
            f"interrupted while drawing metrics.png; the checkpoint of step {state.step} is saved in {opts.folder}: "
            "run the same command with --resume to finish"
        ) from exc
    if joined:
        runtime.leave()
    return FinetuneResult(
        out=str(opts.folder),
        steps=state.step,
        epochs=state.step / per_epoch,
        train_loss_bpd=_last_loss(opts.folder),
        eval=dict(evaluate.latest),
        seconds=time.perf_counter() - start,
        plot=plot,
    )


def _read_metrics(out: Path) -> list[dict[str, Any]]:
    """The lines of DIR/metrics.jsonl; a last line cut short by a killed process is skipped."""
    path = out / METRICS
    entries = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return [e for e in entries if isinstance(e, dict) and "step" in e]


def _replace_text(path: Path, text: str) -> None:
    """Write `path` whole through a temporary sibling and a rename (a kill leaves the old or the new file)."""
    from itdcli import outputs

    outputs.clear_stale(path)  # the run folder is held by this process, so a sibling temporary is a killed one's
    outputs.write_atomic(path, text.encode())


def _last_loss(out: Path) -> float | None:
    """The last logged training loss in bits/dim."""
    losses = [m["loss_bpd"] for m in _read_metrics(out) if "loss_bpd" in m]
    return losses[-1] if losses else None


def _plot(out: Path) -> str | None:
    """DIR/metrics.png: training loss and evaluation NLL (bits/dim) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _read_metrics(out)
    train_pts = [(m["step"], m["loss_bpd"]) for m in metrics if "loss_bpd" in m]
    if not train_pts:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.5), constrained_layout=True)
    ax.plot(*zip(*train_pts, strict=True), label="training ITD loss", alpha=0.7)
    evals = [m for m in metrics if "eval" in m]
    for name in sorted({k for m in evals for k in m["eval"]}):
        pts = [(m["step"], m["eval"][name]) for m in evals if name in m["eval"]]
        ax.plot(*zip(*pts, strict=True), "o-", label=f"eval {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path = out / "metrics.png"
    tmp = out / ".itd-tmp-metrics.png"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return str(path)
