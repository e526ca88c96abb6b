"""CIFAR-10 without torchvision: the `cifar-10-batches-py/` pickles and improved-diffusion PNG folders.

Pickles are read with a restricted unpickler that admits only numpy's array reconstruction (plus latin-1
`_codecs.encode`, which Python 3 writes for bytes at pickle protocol 2); anything else is refused unexecuted.

Checksums: `load_cifar_batches` checks each batch file it reads against the published md5s (`CIFAR_MD5S`)
unless `verify=False`; `md5s` replaces the published value for the file names it lists. The names
`cifar_train` / `cifar_test` (in `paths.cifar_dir()`) and `cifar-10-batches-py` folders given as paths follow
one rule: the published md5s, unless the folder holds `.itd-md5.json`, a JSON object from file name to md5
written by whoever placed a custom copy (a mirror, a test fake), which then overrides them.

Paths: a `cifar-10-batches-py` folder loads its test split (name `<folder>:test`, train `<folder>:train`);
`<folder>:train` and `<folder>:test` pick a split. A folder whose images are all named `{class}_{i:05d}.png`
(improved-diffusion) loads in pickle order, i.e. sorted by i, not by path.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import itertools
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import torch

from itdcli import paths
from itdcli.data.dataset import Dataset
from itdcli.data.folders import list_images, read_image, to_rgb
from itdcli.download import CIFAR_MEMBERS
from itdcli.errors import ItdError

Split = Literal["train", "test"]

CIFAR_MD5S = CIFAR_MEMBERS  # the published md5s, kept once beside the download artifact
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{k}" for k in range(1, 6)),
    "test": ("test_batch",),
}
MANIFEST = ".itd-md5.json"
TRAIN_NAME = "cifar_train"
LEVELS = 256
SIDE = 32
PIXELS = 3 * SIDE * SIDE
NUM_CLASSES = 10
PNG_CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PNG_NAME = re.compile(rf"({'|'.join(PNG_CLASSES)})_(\d{{5}})\.png")
REDOWNLOAD = "re-download it with `itd download cifar10 --force`"


def numpy_reconstruct() -> Any:
    """numpy's `_reconstruct` (in `numpy._core.multiarray` from numpy 2, `numpy.core.multiarray` before)."""
    try:
        module = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # older numpy
        module = importlib.import_module("numpy.core.multiarray")
    return module._reconstruct


def latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol <= 2, admitted for latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted only for latin-1 text, got encoding {encoding!r}")
    return text.encode("latin1")


RECONSTRUCT = numpy_reconstruct()
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): latin1_encode,
}


class BatchUnpickler(pickle.Unpickler):
    """An unpickler (encoding='bytes') that resolves only the globals CIFAR-10 batches need."""

    def __init__(self, file: io.BytesIO, source: Path) -> None:
        """Read from `file`; `source` names the file in error messages."""
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Return an admitted global, or raise ItdError before anything is imported or called."""
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise ItdError(
                f"refusing to unpickle {module}.{name} from {self.source}: "
                "CIFAR-10 batches contain only arrays, lists and strings"
            )
        return found


def unpickle(raw: bytes, path: Path) -> object:
    """Unpickle a batch file's bytes with BatchUnpickler; damaged data raise ItdError."""
    try:
        return BatchUnpickler(io.BytesIO(raw), path).load()
    except ItdError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways; all mean the same to the user
        raise ItdError(f"cannot read {path} as a CIFAR-10 batch ({type(err).__name__}: {err}); {REDOWNLOAD}") from err


def read_bytes(path: Path) -> bytes:
    """The contents of a batch file; a missing or unreadable file raises ItdError."""
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ItdError(f"missing {path}: the CIFAR-10 folder is incomplete; {REDOWNLOAD}") from err
    except OSError as err:
        raise ItdError(f"cannot read {path}: {err}") from err


def check_md5(path: Path, raw: bytes, expected: str) -> None:
    """Raise ItdError when the md5 of `raw` differs from `expected`."""
    got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if got != expected.lower():
        raise ItdError(
            f"{path} has md5 {got}, expected {expected}: the file is damaged or not the published CIFAR-10; "
            f"{REDOWNLOAD}, or for a custom copy pass verify=False or list its md5s in {path.parent / MANIFEST}"
        )


def field(batch: dict[Any, Any], key: str, path: Path) -> Any:
    """The entry `key` of a batch dict, spelled as str or as bytes."""
    for spelling in (key, key.encode()):
        if spelling in batch:
            return batch[spelling]
    raise ItdError(f"{path} has no {key!r} entry, so it is not a CIFAR-10 batch; {REDOWNLOAD}")


def batch_rows(data: object, path: Path) -> npt.NDArray[np.uint8]:
    """Check a batch's 'data' entry: uint8 rows of 3072 values."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ItdError(f"{path}: 'data' is {what}, expected uint8 rows of {PIXELS}; {REDOWNLOAD}")
    return cast("npt.NDArray[np.uint8]", data)


def batch_labels(labels: object, n: int, path: Path) -> npt.NDArray[np.int64]:
    """Check a batch's 'labels' entry: n integers in 0..9, returned as int64."""
    bad = ItdError(f"{path}: 'labels' are not {n} integers in 0..{NUM_CLASSES - 1}; {REDOWNLOAD}")
    try:
        array = np.asarray(labels)
    except ValueError as err:
        raise bad from err
    if array.dtype.kind not in "iu" or array.shape != (n,) or not ((array >= 0) & (array < NUM_CLASSES)).all():
        raise bad
    return array.astype(np.int64)


def batch_arrays(batch: object, path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Check an unpickled batch and return its (n, 3072) uint8 rows and n int64 labels."""
    if not isinstance(batch, dict):
        raise ItdError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict; {REDOWNLOAD}")
    rows = batch_rows(field(batch, "data", path), path)
    return rows, batch_labels(field(batch, "labels", path), rows.shape[0], path)


def read_batch(path: Path, expected_md5: str | None) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Read, optionally verify, and unpickle one batch file into (rows, labels)."""
    raw = read_bytes(path)
    if expected_md5 is not None:
        check_md5(path, raw, expected_md5)
    return batch_arrays(unpickle(raw, path), path)


def check_split(split: str) -> Split:
    """Return `split` if it is 'train' or 'test', else raise ItdError."""
    if split not in SPLIT_FILES:
        raise ItdError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    return cast(Split, split)


def load_cifar_batches(
    folder: str | os.PathLike[str], split: Split, *, verify: bool = True, md5s: dict[str, str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of `cifar-10-batches-py/` as uint8 images (N, 3, 32, 32) and int64 labels, in pickle order."""
    expected = {**CIFAR_MD5S, **(md5s or {})}
    parts = [
        read_batch(Path(folder) / name, expected.get(name) if verify else None)
        for name in SPLIT_FILES[check_split(split)]
    ]
    images = np.concatenate([rows for rows, _ in parts]).reshape(-1, 3, SIDE, SIDE)
    labels = np.concatenate([labels for _, labels in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def read_manifest(folder: Path) -> dict[str, str] | None:
    """The md5 override in `<folder>/.itd-md5.json`, or None when there is no such file."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ItdError(f"cannot read {path}: {err}; fix or delete it") from err
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise ItdError(f'{path} must be a JSON object from file name to md5, e.g. {{"test_batch": "<md5>"}}')
    return cast("dict[str, str]", manifest)


def is_cifar_batches_folder(path: Path) -> bool:
    """True for a folder holding `test_batch` or `data_batch_1`."""
    return path.is_dir() and any((path / name).is_file() for name in ("test_batch", "data_batch_1"))


def cifar_dataset(folder: Path, split: Split, name: str, train: str) -> Dataset:
    """A split of a batches folder as a 256-level Dataset, verified as the module docstring says."""
    images, _ = load_cifar_batches(folder, split, md5s=read_manifest(folder))
    return Dataset.create(name, images, LEVELS, train=train)


def load_cifar_batches_folder(folder: Path, split: Split = "test") -> Dataset:
    """A split of a `cifar-10-batches-py` folder given as a path: name `<folder>:<split>`, train `<folder>:train`."""
    return cifar_dataset(folder, split, f"{folder}:{split}", f"{folder}:train")


def split_source(source: str) -> tuple[Path, Split] | None:
    """Parse `<batches folder>:train|test` into (folder, split); None when `source` is not of that form."""
    head, sep, tail = source.rpartition(":")
    folder = Path(head).expanduser()
    if not sep or not head or tail not in SPLIT_FILES or not folder.is_dir():
        return None
    if not is_cifar_batches_folder(folder):
        raise ItdError(
            f"the suffix :{tail} picks a split of a cifar-10-batches-py folder, but {folder} holds neither "
            "test_batch nor data_batch_1; give the folder that holds them"
        )
    return folder, check_split(tail)


def cifar_named(split: Split) -> Dataset:
    """The registered `cifar_<split>` dataset, read from `paths.cifar_dir()`."""
    folder = paths.cifar_dir()
    if not folder.is_dir():
        raise ItdError(
            f"CIFAR-10 is not downloaded: run `itd download cifar10` (or place cifar-10-batches-py/ at {folder})"
        )
    return cifar_dataset(folder, split, f"cifar_{split}", TRAIN_NAME)


def cifar_train() -> Dataset:
    """The CIFAR-10 training split (50,000 images, 256 levels) from the downloaded pickles."""
    return cifar_named("train")


def cifar_test() -> Dataset:
    """The CIFAR-10 test split (10,000 images, 256 levels) from the downloaded pickles."""
    return cifar_named("test")


def is_cifar_png_folder(folder: Path) -> bool:
    """True when the folder has images and every one is named `{class}_{i:05d}.png` (improved-diffusion)."""
    images = list_images(folder)
    return bool(images) and all(PNG_NAME.fullmatch(p.name) for p in images)


def png_key(path: Path) -> tuple[int, int]:
    """(index i, label) from a `{class}_{i:05d}.png` file name."""
    match = PNG_NAME.fullmatch(path.name)
    if match is None:
        raise ItdError(f"{path.name} is not named {{class}}_{{index:05d}}.png with a CIFAR-10 class; rename or move it")
    return int(match[2]), PNG_CLASSES.index(match[1])


def check_unique(keyed: list[tuple[int, int, Path]]) -> None:
    """Raise ItdError naming two files with the same index (`keyed` sorted by index)."""
    for (index, _, first), (other, _, second) in itertools.pairwise(keyed):
        if index == other:
            raise ItdError(f"{first} and {second} both have index {index}; keep one image per index")


def read_cifar_png(path: Path) -> npt.NDArray[np.uint8]:
    """One 32x32 image as uint8 (3, 32, 32) (grey repeated to RGB)."""
    image = to_rgb(read_image(path))
    if image.shape != (3, SIDE, SIDE):
        height, width = image.shape[1:]
        raise ItdError(f"{path} is {width}x{height}; CIFAR-10 images named like it must be {SIDE}x{SIDE}")
    return image


def load_cifar_png_folder(folder: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An improved-diffusion PNG folder as uint8 (N, 3, 32, 32), int64 labels and indices, sorted by index."""
    files = list_images(Path(folder))
    if not files:
        raise ItdError(f"no images found in folder {folder}; expected files named {{class}}_{{index:05d}}.png")
    keyed = sorted((*png_key(p), p) for p in files)
    check_unique(keyed)
    images = np.stack([read_cifar_png(p) for _, _, p in keyed])
    labels = torch.tensor([label for _, label, _ in keyed], dtype=torch.int64)
    indices = torch.tensor([index for index, _, _ in keyed], dtype=torch.int64)
    return torch.from_numpy(images), labels, indices


def png_train_sibling(folder: Path) -> str | None:
    """The absolute path of a sibling `cifar_train` folder when `folder` is named `cifar_test`, else None."""
    folder = folder.resolve()
    sibling = folder.parent / TRAIN_NAME
    return str(sibling) if folder.name == "cifar_test" and sibling.is_dir() else None


def load_cifar_png_dataset(folder: Path) -> Dataset:
    """An improved-diffusion PNG folder as a 256-level Dataset in pickle order, named by its path."""
    images, _, _ = load_cifar_png_folder(folder)
    return Dataset.create(str(folder), images, LEVELS, train=png_train_sibling(folder))
