"""Reading a folder of image files (searched recursively) into a Dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from itdcli.data.arrays import as_levels
from itdcli.data.dataset import Dataset
from itdcli.errors import ItdError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
GREY_MODES = frozenset({"L", "1"})
DEEP_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


def is_image_name(name: str) -> bool:
    """True for a visible file name with an image suffix (any case)."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, skipping hidden entries, sorted by relative path parts."""
    found: list[Path] = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(Path(folder, f) for f in files if is_image_name(f))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def read_image(path: Path) -> npt.NDArray[np.uint8]:
    """Decode one image (first frame) as uint8 (C, H, W): 1 channel for L and 1 modes, else 3 (RGB)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in DEEP_MODES:
                raise ItdError(f"image {path} has {im.mode} pixels; only 8-bit images work, save it as 8-bit")
            if im.mode in GREY_MODES:
                return np.asarray(im.convert("L"), dtype=np.uint8)[None]
            return np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ItdError(f"cannot read image {path}: {err}; remove or re-save this file") from err


def check_sizes(paths: list[Path], pixels: list[npt.NDArray[np.uint8]]) -> None:
    """Raise ItdError naming two files when the images are not all the same size."""
    height, width = pixels[0].shape[1:]
    for path, image in zip(paths, pixels, strict=True):
        if image.shape[1:] != (height, width):
            raise ItdError(
                f"images differ in size: {paths[0]} is {width}x{height} but {path} is "
                f"{image.shape[2]}x{image.shape[1]} (width x height); resize them to one size"
            )


def to_rgb(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Repeat a grey (1, H, W) image to 3 channels (as PIL's L to RGB does); RGB passes through."""
    return np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image


def load_folder(root: Path, levels: int | None) -> Dataset:
    """All images under `root` as uint8 NCHW levels: 1 channel if every image is grey, else RGB."""
    paths = list_images(root)
    if not paths:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise ItdError(f"no images found in folder {root}; put image files ({suffixes}) in it or below it")
    pixels = [read_image(p) for p in paths]
    check_sizes(paths, pixels)
    if any(image.shape[0] != 1 for image in pixels):
        pixels = [to_rgb(image) for image in pixels]
    stacked: npt.NDArray[Any] = np.stack(pixels)
    data, out_levels = as_levels(stacked, levels, f"folder {root}")
    return Dataset.create(str(root), torch.from_numpy(np.ascontiguousarray(data)), out_levels)
