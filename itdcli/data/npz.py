"""Reading a numpy .npz file into a Dataset."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from itdcli.data.arrays import dataset_from_array
from itdcli.data.dataset import Dataset
from itdcli.errors import ItdError

PREFERRED_KEYS = ("x", "images", "data", "arr_0")


def pick_key(keys: list[str], path: Path) -> str:
    """The single key, else the first of PREFERRED_KEYS present, else raise ItdError listing the keys."""
    if len(keys) == 1:
        return keys[0]
    for key in PREFERRED_KEYS:
        if key in keys:
            return key
    if not keys:
        raise ItdError(f"{path} holds no arrays; save the images with numpy.savez({path.name}, x=images)")
    raise ItdError(
        f"{path} holds arrays {', '.join(keys)} but none is named {', '.join(PREFERRED_KEYS)}; "
        "save the images under the key x"
    )


def read_npz(path: Path) -> tuple[npt.NDArray[Any], str]:
    """Load the image array from an .npz file (no pickles); returns it with its key."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ItdError(f"{path} is a single .npy array, not an .npz archive; save it with numpy.savez")
        with loaded as archive:
            key = pick_key(list(archive.files), path)
            return archive[key], key
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ItdError(f"cannot read {path} as a numpy .npz file: {err}; write it with numpy.savez") from err


def load_npz(path: Path, levels: int | None) -> Dataset:
    """Dataset from an .npz file: uint8 or integer levels (discrete) or floats (continuous)."""
    arr, key = read_npz(path)
    return dataset_from_array(str(path), arr, levels, f"{path} (array {key!r})", owned=True)
