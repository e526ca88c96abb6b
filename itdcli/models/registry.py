"""Named models and `module.path:attribute` user models, resolved to one `Denoiser` (the uvicorn convention)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from itdcli.core.gaussian import GaussianReference
from itdcli.errors import ItdError
from itdcli.models.base import Denoiser


@dataclass(frozen=True)
class ModelContext:
    """What a named model may need from the run: the Gaussian reference fitted for the data."""

    reference: GaussianReference | None = None


def _gaussian(ctx: ModelContext) -> Denoiser:
    """The optimal linear denoiser of the run's reference N(μ, Σ)."""
    from itdcli.models.gaussian import GaussianDenoiser

    if ctx.reference is None:
        raise ItdError("the 'gaussian' model needs a reference Gaussian: pass reference=DATA or a GaussianReference")
    return GaussianDenoiser(ctx.reference)


REGISTRY: dict[str, Callable[[ModelContext], Denoiser]] = {"gaussian": _gaussian}


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


def load_model(model: str | Denoiser, reference: GaussianReference | None = None) -> Denoiser:
    """The `Denoiser` that `--model` names: a registered name, `module.path:attribute`, or a callable."""
    if not isinstance(model, str):
        return as_denoiser(model, type(model).__name__)
    if model in REGISTRY:
        return REGISTRY[model](ModelContext(reference))
    if ":" in model and not os.path.exists(model):
        return as_denoiser(_import_attribute(model), model)
    known = ", ".join(model_names())
    raise ItdError(f"unknown model '{model}': use one of {known}, or module.path:attribute for your own network")
