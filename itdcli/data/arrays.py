"""Turning in-memory arrays and tensors into Datasets: layout, dtype and level checks."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from itdcli.data.dataset import Dataset
from itdcli.errors import ItdError

MAX_LEVELS = 32768
CHANNEL_SIZES = (1, 3, 4)
LAYOUTS = "(N, d), (N, H, W), (N, C, H, W) or (N, H, W, C)"


def check_levels(levels: object) -> int:
    """Return `levels` if it is an int in [2, MAX_LEVELS], else raise ItdError."""
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= MAX_LEVELS:
        raise ItdError(f"--levels must be an integer from 2 to {MAX_LEVELS}, got {levels!r}")
    return levels


def storage_dtype(levels: int) -> np.dtype[Any]:
    """The numpy dtype that holds level indices 0..levels-1: uint8 up to 256 levels, else int16."""
    return np.dtype(np.uint8) if levels <= 256 else np.dtype(np.int16)


def to_nchw(arr: npt.NDArray[Any], what: str) -> npt.NDArray[Any]:
    """Move channels-last 4-D arrays to NCHW, add a channel axis to (N, H, W), keep (N, d)."""
    if arr.ndim == 4 and arr.shape[-1] in CHANNEL_SIZES and arr.shape[1] not in CHANNEL_SIZES:
        return arr.transpose(0, 3, 1, 2)
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim in (2, 4):
        return arr
    raise ItdError(f"{what} has shape {tuple(arr.shape)}; expected one of {LAYOUTS}")


def check_not_empty(arr: npt.NDArray[Any], what: str) -> None:
    """Raise ItdError when there are no samples or a sample has no coordinates."""
    if arr.shape[0] == 0 or arr.size == 0:
        raise ItdError(f"{what} is empty (shape {tuple(arr.shape)}); give at least one non-empty sample")


def _levels_advice(arr: npt.NDArray[Any]) -> str:
    """What to give so that integer data can be read: a --levels that is allowed, or what to change first."""
    high = int(arr.max())
    step = int(np.gcd.reduce(arr.reshape(-1).astype(np.int64)))
    as_is = f"give --levels {max(high + 1, 2)} (or more, up to {MAX_LEVELS})" if high + 1 <= MAX_LEVELS else None
    if step > 1 and high // step + 1 <= MAX_LEVELS:
        scaled = (
            f"its values are multiples of {step}: divide the array by {step}, then give --levels {high // step + 1}"
        )
        return scaled + (f"; or, to read them as they are, {as_is}" if as_is else "")
    return (
        as_is
        or f"more than {MAX_LEVELS} levels are not supported: save the data as float32 to score them as continuous"
    )


def as_levels(arr: npt.NDArray[Any], levels: int | None, what: str) -> tuple[npt.NDArray[Any], int]:
    """Validate integer data as level indices 0..L-1 and cast to the storage dtype; returns (array, L)."""
    low, high = int(arr.min()), int(arr.max())
    if low < 0:
        raise ItdError(f"{what} holds negative values (min {low}); integer data must be level indices 0..L-1")
    if levels is None:
        if arr.dtype != np.uint8:
            raise ItdError(
                f"{what} holds {arr.dtype.name} integers read as level indices 0..L-1: {_levels_advice(arr)}"
            )
        levels = 256
    levels = check_levels(levels)
    if high > levels - 1:
        raise ItdError(f"{what} holds values up to {high}, outside the levels 0..{levels - 1}: {_levels_advice(arr)}")
    return arr.astype(storage_dtype(levels), copy=False), levels


def as_continuous(arr: npt.NDArray[Any], levels: int | None, what: str) -> npt.NDArray[Any]:
    """Validate float data (finite, no --levels) and cast to float32."""
    if levels is not None:
        raise ItdError(
            f"{what} holds {arr.dtype.name} values: float data are continuous and used as they are; "
            "--levels applies only to integer arrays"
        )
    out = arr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ItdError(f"{what} contains NaN or infinite values; remove or replace them")
    return out


def dataset_from_array(name: str, arr: npt.NDArray[Any], levels: int | None, what: str, *, owned: bool) -> Dataset:
    """Build a Dataset from a numpy array (copied unless `owned`, so later edits cannot change it)."""
    data = to_nchw(arr, what)
    check_not_empty(data, what)
    if data.dtype.kind == "f":
        out, out_levels = as_continuous(data, levels, what), None
    elif data.dtype.kind in "iu":
        out, out_levels = as_levels(data, levels, what)
    else:
        raise ItdError(f"{what} has dtype {data.dtype.name}; use uint8 images, integer levels or floats")
    if not owned and np.may_share_memory(out, arr):
        out = out.copy()
    return Dataset.create(name, torch.from_numpy(np.ascontiguousarray(out)), out_levels)


def tensor_to_numpy(x: torch.Tensor) -> npt.NDArray[Any]:
    """A CPU numpy view of a tensor; float types numpy lacks (bfloat16) become float32."""
    if x.dtype == torch.bool or x.is_complex():
        raise ItdError(f"tensor has dtype {x.dtype}; use uint8 images, integer levels or floats")
    x = x.detach().cpu()
    if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.float()
    return x.numpy()


def from_tensor(x: torch.Tensor, levels: int | None) -> Dataset:
    """Dataset from a torch tensor, named '<tensor>'."""
    return dataset_from_array("<tensor>", tensor_to_numpy(x), levels, "the tensor", owned=False)


def from_array(arr: npt.NDArray[Any], levels: int | None) -> Dataset:
    """Dataset from a numpy array, named '<array>'."""
    return dataset_from_array("<array>", arr, levels, "the array", owned=False)
