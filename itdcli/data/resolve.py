"""Dispatch a data source (Dataset, tensor, array, registered name or path) to its loader."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from itdcli.data.arrays import check_levels, from_array, from_tensor
from itdcli.data.cifar import (
    is_cifar_batches_folder,
    is_cifar_png_folder,
    load_cifar_batches_folder,
    load_cifar_png_dataset,
    split_source,
)
from itdcli.data.dataset import Dataset
from itdcli.data.folders import IMAGE_SUFFIXES, load_folder
from itdcli.data.npz import load_npz
from itdcli.data.registry import REGISTRY
from itdcli.errors import ItdError

Source = str | os.PathLike[str] | torch.Tensor | npt.NDArray[Any] | Dataset


def resolve(source: Source, levels: int | None) -> Dataset:
    """Turn any accepted data source into a Dataset (see load_data)."""
    if levels is not None:
        check_levels(levels)
    if isinstance(source, Dataset):
        return check_same_levels(source, levels)
    if isinstance(source, torch.Tensor):
        return from_tensor(source, levels)
    if isinstance(source, np.ndarray):
        return from_array(source, levels)
    if isinstance(source, str) and source in REGISTRY:
        return check_same_levels(REGISTRY[source](), levels)
    if isinstance(source, str | os.PathLike):
        return from_path(source, levels)
    raise TypeError(f"cannot load data from a {type(source).__name__}")


def check_same_levels(dataset: Dataset, levels: int | None) -> Dataset:
    """Return `dataset`, or raise ItdError when `levels` asks for a different number of levels."""
    if levels is None or levels == dataset.levels:
        return dataset
    have = f"{dataset.levels} levels" if dataset.levels is not None else "continuous values"
    raise ItdError(f"dataset {dataset.name} has {have}; leave out --levels (got {levels})")


def looks_like_path(text: str) -> bool:
    """True when a string is evidently meant as a path (has a separator, a suffix or a leading ~)."""
    separators = [os.sep, "/"] + ([os.altsep] if os.altsep else [])
    return any(s in text for s in separators) or text.startswith("~") or Path(text).suffix != ""


def from_path(source: str | os.PathLike[str], levels: int | None) -> Dataset:
    """Load a folder or an .npz file; explain unknown names, missing paths and unsupported files."""
    if not os.fspath(source).strip():
        raise ItdError("no data given: the data source is an empty string; give a dataset name or a path")
    path = Path(source).expanduser()
    if path.is_dir():
        return from_folder(path, levels)
    if path.is_file():
        return from_file(path, levels)
    if path.exists():
        raise ItdError(f"{path} is neither a regular file nor a folder; give an image folder or a .npz file")
    split = split_source(os.fspath(source))
    if split is not None:
        return check_same_levels(load_cifar_batches_folder(*split), levels)
    if isinstance(source, str) and not looks_like_path(source):
        names = ", ".join(sorted(REGISTRY))
        raise ItdError(
            f"unknown dataset {source!r}: not a file or folder, and not one of the names {names}; "
            "give a path to an image folder or .npz file"
        )
    raise ItdError(f"no such file or folder: {path}")


def from_folder(path: Path, levels: int | None) -> Dataset:
    """A cifar-10-batches-py folder (test split), an improved-diffusion CIFAR-10 PNG folder, or image folder."""
    if is_cifar_batches_folder(path):
        return check_same_levels(load_cifar_batches_folder(path), levels)
    if is_cifar_png_folder(path):
        return check_same_levels(load_cifar_png_dataset(path), levels)
    return load_folder(path, levels)


def from_file(path: Path, levels: int | None) -> Dataset:
    """Load an .npz file; other file types raise ItdError listing the supported inputs."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_npz(path, levels)
    hint = "; to use a single image, put it in a folder" if suffix in IMAGE_SUFFIXES else ""
    raise ItdError(
        f"cannot read {path}: unsupported file type {suffix or '(no suffix)'!r}; supported inputs are "
        f"a folder of images, a .npz file or a dataset name ({', '.join(sorted(REGISTRY))}){hint}"
    )
