"""Tests of the bundled digits datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itdcli.data import dataset_names, load_data
from itdcli.data.digits import digits_labels, digits_tensors


def test_names_are_sorted_and_include_digits() -> None:
    """dataset_names lists the two digits splits in sorted order."""
    names = dataset_names()
    assert names == sorted(names)
    assert {"digits_train", "digits_test"} <= set(names)


@pytest.mark.parametrize(("name", "size"), [("digits_train", 1437), ("digits_test", 360)])
def test_split_sizes_and_levels(name: str, size: int) -> None:
    """Each split has its fixed size, 17 levels, 8x8 grey images and train='digits_train'."""
    ds = load_data(name)
    assert (ds.name, len(ds), ds.shape, ds.dim) == (name, size, (1, 8, 8), 64)
    assert ds.levels == 17 and ds.is_discrete and ds.delta == pytest.approx(2 / 16)
    assert ds.x.dtype == torch.uint8
    assert int(ds.x.min()) == 0 and int(ds.x.max()) == 16
    assert ds.train == "digits_train"


def test_splits_partition_the_file_by_index_mod_5() -> None:
    """Test holds images 0, 5, 10, ...; train holds the rest, both in file order."""
    images, _ = digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
    index = np.arange(1797)
    assert torch.equal(load_data("digits_test").x, images[index % 5 == 0])
    assert torch.equal(load_data("digits_train").x, images[index % 5 != 0])


def test_labels_follow_the_split() -> None:
    """Labels of the test split are those at indices 0, 5, 10, ...; all classes appear."""
    _, labels = digits_tensors()
    assert torch.equal(digits_labels("test"), labels[::5].long())
    assert set(digits_labels("train").tolist()) == set(range(10))


def test_digits_match_scikit_learn() -> None:
    """The bundled pixels and labels equal scikit-learn's load_digits at the split indices."""
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    index = np.arange(len(bunch.images))
    for split, mask in (("test", index % 5 == 0), ("train", index % 5 != 0)):
        ds = load_data(f"digits_{split}")
        np.testing.assert_array_equal(ds.x[:, 0].numpy(), bunch.images[mask])
        np.testing.assert_array_equal(digits_labels(split).numpy(), bunch.target[mask])


def test_digits_hash_is_stable_and_distinct() -> None:
    """Loading twice gives the same sha256; the two splits differ."""
    assert load_data("digits_test").sha256 == load_data("digits_test").sha256
    assert load_data("digits_test").sha256 != load_data("digits_train").sha256


def test_digits_with_matching_levels_is_accepted() -> None:
    """levels=17 agrees with the digits and is allowed."""
    assert load_data("digits_test", levels=17).levels == 17
