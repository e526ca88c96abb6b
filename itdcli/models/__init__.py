"""Model adapters: every network becomes eps_hat = denoiser(z, logsnr); plus the registry of named models."""

from itdcli.models.base import Denoiser
from itdcli.models.registry import load_model, model_names

__all__ = ["Denoiser", "load_model", "model_names"]
