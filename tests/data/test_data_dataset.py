"""Tests of the Dataset type: scaling, subset, hashing, and loading tensors and arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itdcli.data import Dataset, load_data
from itdcli.data.dataset import content_hash
from itdcli.errors import ItdError


def grid_images(n: int = 6) -> np.ndarray:
    """Deterministic uint8 NCHW images covering 0 and 255."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 3, 6, 5), dtype=np.uint8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0, 255
    return x


def test_values_map_levels_to_minus_one_plus_one() -> None:
    """Level 0 -> -1, L-1 -> +1, and k -> 2k/(L-1) - 1 in float32."""
    ds = load_data(grid_images())
    v = ds.values()
    assert v.dtype == torch.float32 and v.shape == ds.x.shape
    assert v[0, 0, 0, 0].item() == -1.0 and v[0, 0, 0, 1].item() == 1.0
    expected = ds.x.double() / 127.5 - 1.0
    assert float((v.double() - expected).abs().max()) < 1e-7


def test_values_with_17_levels_and_index() -> None:
    """With 17 levels the grid step is 2/16 and indexing selects samples."""
    x = torch.arange(17, dtype=torch.uint8).reshape(1, 17).repeat(3, 1)
    ds = load_data(x, levels=17)
    assert ds.delta == pytest.approx(0.125) and ds.shape == (17,)
    v = ds.values(slice(1, 3))
    assert v.shape == (2, 17)
    assert torch.equal(v[0], torch.linspace(-1, 1, 17))
    assert ds.values(torch.tensor([2])).shape == (1, 17)


def test_continuous_values_are_the_floats() -> None:
    """Float data are continuous: no levels, no delta, values returned unchanged."""
    x = torch.linspace(-1, 1, 24).reshape(2, 12)
    ds = load_data(x)
    assert not ds.is_discrete and ds.levels is None and ds.delta is None
    assert ds.shape == (12,) and ds.dim == 12 and len(ds) == 2
    assert torch.equal(ds.values(), x)


def test_subset_takes_the_first_items() -> None:
    """subset(n) keeps the first n samples, the name and the train split, and rehashes."""
    full = load_data("digits_test")
    part = full.subset(10)
    assert len(part) == 10 and part.name == full.name and part.train == full.train
    assert torch.equal(part.x, full.x[:10])
    assert part.sha256 == content_hash(full.x[:10], 17) != full.sha256
    assert full.subset(len(full)) is full


@pytest.mark.parametrize("n", [0, 361])
def test_subset_out_of_range_is_an_error(n: int) -> None:
    """Asking for no samples or more than there are raises ItdError with the size."""
    with pytest.raises(ItdError, match="360"):
        load_data("digits_test").subset(n)


def test_sha256_changes_when_one_pixel_changes() -> None:
    """The content hash sees single-pixel edits, levels and dtype."""
    x = grid_images()
    base = load_data(x).sha256
    y = x.copy()
    y[3, 1, 2, 4] ^= 1
    assert load_data(y).sha256 != base
    assert load_data(x.copy()).sha256 == base
    assert load_data(x, levels=300).sha256 != base
    assert content_hash(torch.from_numpy(x), 256) == base


def test_input_array_is_copied() -> None:
    """Editing the caller's array afterwards does not change the Dataset."""
    x = grid_images()
    ds = load_data(x)
    x[0, 0, 0, 0] = 7
    assert int(ds.x[0, 0, 0, 0]) == 0
    assert ds.sha256 == content_hash(ds.x, 256)


def test_tensor_and_array_names_and_layouts() -> None:
    """Tensors and arrays get placeholder names; NHWC arrays become NCHW."""
    x = grid_images()
    assert load_data(torch.from_numpy(x)).name == "<tensor>"
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    ds = load_data(nhwc)
    assert ds.name == "<array>" and ds.train is None
    assert np.array_equal(ds.x.numpy(), x)


def test_dataset_is_returned_as_is() -> None:
    """A Dataset passes through unchanged; a conflicting levels is an error."""
    ds = load_data("digits_test")
    assert load_data(ds) is ds
    with pytest.raises(ItdError, match="17 levels"):
        load_data(ds, levels=256)


def test_wide_levels_use_int16() -> None:
    """Integer data with more than 256 levels are stored as int16."""
    x = np.array([[0, 500], [999, 3]], dtype=np.int64)
    ds = load_data(x, levels=1000)
    assert ds.x.dtype == torch.int16 and ds.levels == 1000
    assert ds.values()[1, 0].item() == 1.0


@pytest.mark.parametrize(
    ("data", "levels", "words"),
    [
        (np.zeros((2, 4), dtype=np.int32), None, "--levels"),
        (np.full((2, 4), 17, dtype=np.uint8), 17, "--levels 18"),
        (np.full((2, 4), -1, dtype=np.int16), 4, "negative"),
        (np.zeros((2, 4), dtype=np.float32), 256, "continuous"),
        (np.array([[np.nan, 0.0]]), None, "NaN"),
        (np.zeros((2, 4), dtype=bool), None, "dtype"),
        (np.zeros((0, 4), dtype=np.uint8), None, "empty"),
        (np.zeros(4, dtype=np.uint8), None, "shape"),
        (np.zeros((2, 4), dtype=np.uint8), 1, "from 2"),
    ],
)
def test_array_errors(data: np.ndarray, levels: int | None, words: str) -> None:
    """Bad arrays and levels raise ItdError naming the fix."""
    with pytest.raises(ItdError, match=words):
        load_data(data, levels=levels)


def test_dataset_checks_dtype_against_levels() -> None:
    """Building a Dataset with a float tensor and levels is a programming error."""
    with pytest.raises(ValueError, match="uint8"):
        Dataset.create("bad", torch.zeros(2, 3), 256)


def test_equality_follows_content() -> None:
    """Datasets with equal name, content and levels are equal and hash alike; other content is not equal."""
    a, b = load_data(grid_images()), load_data(grid_images())
    assert a == b and hash(a) == hash(b) and a.x is not b.x
    assert a != load_data(grid_images(5))


def test_repr_is_short() -> None:
    """repr names the dataset without printing pixels."""
    text = repr(load_data("digits_test"))
    assert "digits_test" in text and "n=360" in text and "tensor" not in text
