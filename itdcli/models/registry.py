"""Named models and `module.path:attribute` user models, resolved to one `Denoiser` (the uvicorn convention)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from itdcli.core.gaussian import GaussianReference
from itdcli.errors import ItdError
from itdcli.models.base import Denoiser
from itdcli.paths import ddpm_dir, iddpm_checkpoint

TimeMap = Literal["exact", "reference"]


@dataclass(frozen=True)
class ModelContext:
    """What a named model may need from the run: the Gaussian reference fitted for the data."""

    reference: GaussianReference | None = None
    time_map: TimeMap = "exact"


def _gaussian(ctx: ModelContext) -> Denoiser:
    """The optimal linear denoiser of the run's reference N(μ, Σ)."""
    from itdcli.models.gaussian import GaussianDenoiser

    if ctx.reference is None:
        raise ItdError("the 'gaussian' model needs a reference Gaussian: pass reference=DATA or a GaussianReference")
    return GaussianDenoiser(ctx.reference)


def _downloaded(path: Path, name: str) -> Path:
    """A downloaded model file or folder, or a one-line error saying how to get it."""
    if not path.exists():
        raise ItdError(f"model '{name}' is not downloaded: run `itd download {name}` (it goes to {path})")
    return path


def _iddpm(name: str) -> Callable[[ModelContext], Denoiser]:
    """The OpenAI IDDPM CIFAR-10 checkpoint `name` from the itd home."""

    def build(ctx: ModelContext) -> Denoiser:
        from itdcli.models.iddpm import load_iddpm

        return load_iddpm(_downloaded(iddpm_checkpoint(name), name), time_map=ctx.time_map)

    return build


def _ddpm(ctx: ModelContext) -> Denoiser:
    """Google's DDPM CIFAR-10 (`google/ddpm-cifar10-32`) from the itd home."""
    from itdcli.models.diffusers_unet import load_diffusers

    return load_diffusers(str(_downloaded(ddpm_dir(), "ddpm")), time_map=ctx.time_map)


def _digits(ctx: ModelContext) -> Denoiser:
    """The bundled demo model: a small IDDPM-architecture UNet trained by `itd finetune --init scratch` on digits."""
    from importlib.resources import as_file, files

    from itdcli.models.checkpoints import load_checkpoint

    with as_file(files("itdcli.models") / "digits") as folder:
        return load_checkpoint(Path(folder))


REGISTRY: dict[str, Callable[[ModelContext], Denoiser]] = {
    "gaussian": _gaussian,
    "digits": _digits,
    "iddpm": _iddpm("iddpm"),
    "iddpm-hybrid": _iddpm("iddpm-hybrid"),
    "ddpm": _ddpm,
}


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(REGISTRY)


def _import_attribute(spec: str) -> Any:
    """Import `module.path:attribute` with the working directory importable, as uvicorn does."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ItdError(f"cannot import module '{module_name}' for model '{spec}': {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ItdError(f"module '{module_name}' has no attribute '{attr}' (model '{spec}')")
        obj = getattr(obj, part)
    return obj


def _is_factory(obj: Any) -> bool:
    """A class, or a function that takes no required arguments, builds the denoiser rather than being it."""
    if inspect.isclass(obj):
        return True
    if not inspect.isfunction(obj):
        return False
    params = inspect.signature(obj).parameters.values()
    return not any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def as_denoiser(obj: Any, name: str) -> Denoiser:
    """Instantiate factories, put modules in eval mode, and check the result is callable."""
    if _is_factory(obj):
        obj = obj()
    if not callable(obj):
        raise ItdError(f"model '{name}' is not callable: expected eps_hat = model(z, logsnr)")
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    denoiser: Denoiser = obj
    return denoiser


def _from_path(path: Path, ctx: ModelContext) -> Denoiser:
    """A model file or folder: an IDDPM `.pt` state_dict or a diffusers UNet2DModel folder."""
    from itdcli.models.checkpoints import checkpoint_dir, load_checkpoint
    from itdcli.models.diffusers_unet import is_diffusers_dir, load_diffusers

    if path.is_dir() and checkpoint_dir(path) is not None:
        return load_checkpoint(path)
    if path.is_dir() and is_diffusers_dir(path):
        return load_diffusers(str(path), time_map=ctx.time_map)
    if path.is_file():
        from itdcli.models.iddpm import load_iddpm

        return load_iddpm(path, time_map=ctx.time_map)
    raise ItdError(
        f"'{path}' is not a model: expected an IDDPM .pt state_dict, a diffusers UNet2DModel folder (config.json) "
        "or an itd checkpoint folder (itd-model.json)"
    )


def load_model(
    model: str | Path | Denoiser, reference: GaussianReference | None = None, time_map: TimeMap = "exact"
) -> Denoiser:
    """The `Denoiser` that `--model` names: a registered name, a model path, `module.path:attribute`, or a callable."""
    ctx = ModelContext(reference, time_map)
    if isinstance(model, Path):
        return _from_path(model, ctx)
    if not isinstance(model, str):
        return as_denoiser(model, type(model).__name__)
    if model in REGISTRY:
        return REGISTRY[model](ctx)
    if os.path.exists(model):
        return _from_path(Path(model), ctx)
    if ":" in model:
        return as_denoiser(_import_attribute(model), model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        from itdcli.models.diffusers_unet import load_diffusers

        return load_diffusers(model, time_map=ctx.time_map)  # a Hub id already in the local cache
    known = ", ".join(model_names())
    raise ItdError(
        f"unknown model '{model}': not a file or folder; use one of {known}, a checkpoint path, "
        "or module.path:attribute for your own network"
    )
