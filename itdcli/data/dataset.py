"""The in-memory dataset type and the resolver from names, paths and arrays."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from itdcli.errors import ItdError


def content_hash(x: torch.Tensor, levels: int | None) -> str:
    """Hex sha256 of the shape, dtype and levels of `x` followed by its raw bytes."""
    arr = np.ascontiguousarray(x.detach().cpu().numpy())
    digest = hashlib.sha256()
    digest.update(f"shape={tuple(arr.shape)};dtype={arr.dtype.name};levels={levels};".encode())
    digest.update(arr.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def level_values(x: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Float32 values on the [-1, 1] model scale of stored samples: grid levels k ↦ 2k/(L−1) − 1, floats as they are."""
    if levels is None:
        return x
    return (x.to(torch.float64) * 2.0 / (levels - 1) - 1.0).to(torch.float32)


@dataclass(frozen=True)
class Dataset:
    """Images as grid-level indices (discrete, `levels` set) or float32 model-scale values (continuous)."""

    name: str
    x: torch.Tensor
    levels: int | None
    sha256: str
    train: str | None = None

    def __post_init__(self) -> None:
        """Check that the storage dtype matches `levels` (cheap checks only; no value scan)."""
        if self.x.dim() < 2:
            raise ValueError(f"Dataset x needs a batch axis and per-sample axes, got shape {self.x.shape}")
        if self.levels is None and self.x.dtype != torch.float32:
            raise ValueError(f"continuous Dataset x must be float32, got {self.x.dtype}")
        if self.levels is not None and self.x.dtype not in (torch.uint8, torch.int16):
            raise ValueError(f"discrete Dataset x must be uint8 or int16 level indices, got {self.x.dtype}")

    @classmethod
    def create(cls, name: str, x: torch.Tensor, levels: int | None, train: str | None = None) -> Dataset:
        """Build a Dataset from a ready tensor, computing its sha256."""
        return cls(name=name, x=x, levels=levels, sha256=content_hash(x, levels), train=train)

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        """Short summary without the pixel data."""
        kind = f"levels={self.levels}" if self.levels is not None else "continuous"
        return f"Dataset({self.name!r}, n={len(self)}, shape={self.shape}, {kind}, sha256={self.sha256[:12]})"

    def __eq__(self, other: object) -> bool:
        """Datasets are equal when name, content hash, levels and train split agree."""
        if not isinstance(other, Dataset):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        """Hash consistent with __eq__."""
        return hash(self._key())

    def _key(self) -> tuple[str, str, int | None, str | None]:
        """Identity tuple used for equality and hashing."""
        return (self.name, self.sha256, self.levels, self.train)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape, e.g. (C, H, W)."""
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Number of coordinates per sample (d)."""
        return math.prod(self.shape)

    @property
    def is_discrete(self) -> bool:
        """True when samples are integer levels on a grid."""
        return self.levels is not None

    @property
    def delta(self) -> float | None:
        """Bin width 2/(L-1) on the [-1, 1] scale, or None for continuous data."""
        return None if self.levels is None else 2.0 / (self.levels - 1)

    def values(self, index: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Float32 samples on the [-1, 1] model scale (continuous data may share memory with x)."""
        return level_values(self.x if index is None else self.x[index], self.levels)

    def subset(self, n: int) -> Dataset:
        """The first n samples as a new Dataset (same name and train split, new sha256)."""
        if n < 1 or n > len(self):
            have = len(self)
            raise ItdError(f"cannot take {n} samples from {self.name}, which has {have}; ask for 1 to {have}")
        if n == len(self):
            return self
        return Dataset.create(self.name, self.x[:n].clone(), self.levels, self.train)


def load_data(
    source: str | os.PathLike[str] | torch.Tensor | npt.NDArray[Any] | Dataset, *, levels: int | None = None
) -> Dataset:
    """Resolve a dataset name, image folder, .npz file, tensor, array or Dataset into a Dataset."""
    from itdcli.data.resolve import resolve

    return resolve(source, levels)


def dataset_names() -> list[str]:
    """Sorted names of the registered datasets."""
    from itdcli.data.registry import REGISTRY

    return sorted(REGISTRY)
