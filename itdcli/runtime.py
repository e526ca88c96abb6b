"""Everything device-, dtype- and RNG-specific: device choice, the float32/TF32 policy, per-image generators."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from itdcli.errors import ItdError

EVAL_PRECISION = "float32 network, TF32 off, float64 reductions"


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit CUDA request without a GPU is an input error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ItdError(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ItdError(f"device '{name}' requested but no CUDA GPU is visible; use --device cpu")
    return device


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Evaluate networks in true float32: TF32 off for matmul and cuDNN, no autograd (spec §11.1)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for image `index` of a run seeded with `seed`: the same draws on any device or batch size."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + index * 0x85EBCA77 + 1) % (2**63))
