"""itd model checkpoints: safetensors weights (EMA and raw) plus a JSON description, loadable by `--model DIR`.

Layout of a fine-tuning folder: `DIR/checkpoint/` holds `itd-model.json` (family, architecture, time map,
trained logSNR range, training arguments), `model.safetensors` (EMA weights, the ones `--model DIR` uses),
`raw.safetensors` and the resume state; the folder is replaced whole at every save.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import torch

from itdcli.errors import ItdError

FORMAT = "itd.checkpoint/1"
DESCRIPTION = "itd-model.json"
WEIGHTS = "model.safetensors"
RAW_WEIGHTS = "raw.safetensors"
SUBFOLDER = "checkpoint"


def checkpoint_dir(path: Path) -> Path | None:
    """The folder holding itd-model.json: `path` itself or its `checkpoint/` subfolder."""
    for folder in (path, path / SUBFOLDER):
        if (folder / DESCRIPTION).is_file():
            return folder
    return None


def describe(denoiser: Any) -> dict[str, Any]:
    """Everything needed to rebuild the denoiser's network without its weights."""
    family = getattr(denoiser, "family", None)
    base: dict[str, Any] = {
        "format": FORMAT,
        "family": family,
        "time_map": denoiser.time_map,
        "trained_logsnr": list(denoiser.trained_logsnr),
    }
    if family == "iddpm":
        return {**base, "arch": dataclasses.asdict(denoiser.unet.config)}
    if family == "diffusers":
        arch = {k: v for k, v in dict(denoiser.unet.config).items() if not k.startswith("_")}
        table = [float(v) for v in denoiser.logsnr_table]
        extra = {"prediction_type": denoiser.prediction_type, "variance": denoiser.variance}
        return {**base, "arch": arch, **extra, "logsnr_table": table}
    raise ItdError("only IDDPM and diffusers UNet models can be fine-tuned and saved; the Gaussian needs no training")


def build(desc: dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised denoiser from a description (the weights are loaded separately)."""
    denoiser: Any
    if desc.get("family") == "iddpm":
        from itdcli.models.iddpm import IDDPMDenoiser
        from itdcli.models.iddpm_unet import IDDPMConfig, IDDPMUNet

        arch: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in desc["arch"].items()}
        denoiser = IDDPMDenoiser(IDDPMUNet(IDDPMConfig(**arch)), time_map=desc["time_map"])
    elif desc.get("family") == "diffusers":
        from diffusers import UNet2DModel

        from itdcli.models.diffusers_unet import DiffusersDenoiser

        unet = cast(Any, UNet2DModel).from_config(desc["arch"])
        abar = torch.sigmoid(torch.tensor(desc["logsnr_table"], dtype=torch.float64))
        time_map = desc["time_map"]
        variance = desc.get("variance", "fixed_small")
        denoiser = DiffusersDenoiser(
            unet, abar, prediction_type=desc["prediction_type"], time_map=time_map, variance=variance
        )
    else:
        raise ItdError(f"unknown model family {desc.get('family')!r} in {DESCRIPTION}: this itd cannot load it")
    denoiser.trained_logsnr = tuple(desc["trained_logsnr"])
    module: torch.nn.Module = denoiser
    return module


def read_description(folder: Path) -> dict[str, Any]:
    """The JSON description of a checkpoint folder, checked for the format tag."""
    try:
        desc: dict[str, Any] = json.loads((folder / DESCRIPTION).read_text())
    except (OSError, ValueError) as exc:
        raise ItdError(f"cannot read {folder / DESCRIPTION}: {exc}") from exc
    if desc.get("format") != FORMAT:
        raise ItdError(f"{folder / DESCRIPTION} is not an {FORMAT} description")
    return desc


def load_checkpoint(path: Path, weights: str = WEIGHTS) -> torch.nn.Module:
    """The denoiser of an itd checkpoint folder with its EMA (default) or raw weights, in eval mode."""
    from safetensors.torch import load_file

    folder = checkpoint_dir(path)
    if folder is None:
        raise ItdError(f"'{path}' holds no {DESCRIPTION}: it is not an itd checkpoint folder")
    denoiser = build(read_description(folder))
    state = load_file(str(folder / weights))
    missing, unexpected = denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ItdError(f"weights in {folder / weights} do not fit the description: {(missing + unexpected)[:3]}")
    return denoiser.eval()
