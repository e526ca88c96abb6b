"""Where itd keeps things: the itd home (ITD_HOME), downloaded models and data, runs and caches."""

from __future__ import annotations

import os
from pathlib import Path

IDDPM_FILES = {
    "iddpm": "cifar10_uncond_vlb_50M_500K.pt",
    "iddpm-hybrid": "cifar10_uncond_50M_500K.pt",
}


def itd_home() -> Path:
    """`ITD_HOME`, else `$XDG_CACHE_HOME/itd`, else `~/.cache/itd`."""
    if os.environ.get("ITD_HOME"):
        return Path(os.environ["ITD_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "itd"


def models_dir() -> Path:
    """Downloaded model files: `<itd home>/models`."""
    return itd_home() / "models"


def data_dir() -> Path:
    """Downloaded datasets: `<itd home>/data`."""
    return itd_home() / "data"


def iddpm_checkpoint(name: str) -> Path:
    """Where `itd download iddpm` / `iddpm-hybrid` puts the OpenAI checkpoint."""
    return models_dir() / IDDPM_FILES[name]


def ddpm_dir() -> Path:
    """Where `itd download ddpm` puts the `google/ddpm-cifar10-32` snapshot (config, weights, scheduler)."""
    return models_dir() / "ddpm-cifar10-32"


def cifar_dir() -> Path:
    """Where `itd download cifar10` extracts `cifar-10-batches-py/`."""
    return data_dir() / "cifar-10-batches-py"
