"""The bundled UCI handwritten digits (8x8, 17 grey levels) and their fixed train/test split."""

from __future__ import annotations

import functools
from importlib import resources

import torch
from safetensors.torch import load_file

from itdcli.data.dataset import Dataset
from itdcli.errors import ItdError

DIGITS_FILE = "digits.safetensors"
DIGITS_LEVELS = 17
TEST_EVERY = 5
TRAIN_NAME = "digits_train"


@functools.lru_cache(maxsize=1)
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled images (uint8, (1797, 1, 8, 8), values 0..16) and labels (uint8, (1797,))."""
    resource = resources.files("itdcli.data").joinpath(DIGITS_FILE)
    try:
        with resources.as_file(resource) as path:
            tensors = load_file(str(path))
    except FileNotFoundError as err:
        raise ItdError(
            f"the bundled {DIGITS_FILE} is missing; reinstall itdcli or run python -m itdcli.data.make_digits"
        ) from err
    return tensors["images"], tensors["labels"]


def split_indices(split: str, n: int) -> torch.Tensor:
    """Indices of the split: image i is in 'test' when i % 5 == 0, else in 'train'."""
    index = torch.arange(n)
    in_test = index % TEST_EVERY == 0
    return index[in_test] if split == "test" else index[~in_test]


def digits_split(split: str) -> Dataset:
    """The 'train' (1,437 images) or 'test' (360 images) split of the bundled digits."""
    images, _ = digits_tensors()
    x = images[split_indices(split, images.shape[0])].contiguous()
    return Dataset.create(f"digits_{split}", x, DIGITS_LEVELS, train=TRAIN_NAME)


def digits_labels(split: str) -> torch.Tensor:
    """Class labels 0..9 (int64) of the 'train' or 'test' split, in dataset order."""
    _, labels = digits_tensors()
    return labels[split_indices(split, labels.shape[0])].long()


def digits_train() -> Dataset:
    """The bundled digits training split (1,437 images, 17 levels)."""
    return digits_split("train")


def digits_test() -> Dataset:
    """The bundled digits test split (360 images, 17 levels)."""
    return digits_split("test")
