"""Write itdcli/data/digits.safetensors from scikit-learn's copy of the UCI digits (maintainer script)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import save_file

OUTPUT = Path(__file__).with_name("digits.safetensors")
METADATA = {
    "source": "UCI ML Repository, Optical Recognition of Handwritten Digits (doi:10.24432/C50P49), "
    "test-set 8x8 images as shipped by sklearn.datasets.load_digits",
    "licence": "CC BY 4.0 (UCI ML Repository, Alpaydin & Kaynak 1998); copy taken from scikit-learn (BSD-3-Clause)",
    "levels": "17",
    "split": "image i is in digits_test when i % 5 == 0, else in digits_train",
}


def digits_arrays() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Images (uint8, (1797, 1, 8, 8)) and labels (uint8, (1797,)) from scikit-learn, in its order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
        raise SystemExit("scikit-learn digits are not integers in 0..16; refusing to write them")
    return images.astype(np.uint8)[:, None], np.asarray(bunch.target).astype(np.uint8)


def main(output: Path = OUTPUT) -> None:
    """Write the images and labels with their provenance to `output`."""
    images, labels = digits_arrays()
    tensors = {"images": torch.from_numpy(images).contiguous(), "labels": torch.from_numpy(labels)}
    save_file(tensors, str(output), metadata=METADATA)
    print(f"wrote {output} ({output.stat().st_size} bytes, {images.shape[0]} images)")


if __name__ == "__main__":
    main()
