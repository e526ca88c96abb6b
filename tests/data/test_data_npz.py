"""Tests of loading .npz files and of path and name resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from itdcli.data import load_data
from itdcli.errors import ItdError

NCHW = np.random.default_rng(5).integers(0, 256, size=(4, 3, 6, 5), dtype=np.uint8)


def save(path: Path, **arrays: np.ndarray) -> Path:
    """Write arrays to an .npz file and return its path."""
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (NCHW, NCHW),
        (NCHW.transpose(0, 2, 3, 1), NCHW),
        (NCHW[:, 0], NCHW[:, :1]),
        (NCHW.reshape(4, -1), NCHW.reshape(4, -1)),
    ],
    ids=["nchw", "nhwc", "nhw", "flat"],
)
def test_layouts_round_trip(tmp_path: Path, stored: np.ndarray, expected: np.ndarray) -> None:
    """NCHW, NHWC, (N, H, W) and (N, d) uint8 arrays load to the written pixels exactly."""
    ds = load_data(save(tmp_path / "d.npz", x=stored))
    assert ds.x.dtype == torch.uint8 and ds.levels == 256
    assert np.array_equal(ds.x.numpy(), expected)
    assert ds.name == str(tmp_path / "d.npz") and ds.train is None


def test_single_array_with_any_key(tmp_path: Path) -> None:
    """A file with one array uses it whatever its key."""
    ds = load_data(save(tmp_path / "one.npz", whatever=NCHW))
    assert np.array_equal(ds.x.numpy(), NCHW)


def test_preferred_key_among_several(tmp_path: Path) -> None:
    """With several arrays the first of x, images, data, arr_0 present is used."""
    path = save(tmp_path / "many.npz", labels=np.arange(4), images=NCHW, data=NCHW[:2])
    assert np.array_equal(load_data(path).x.numpy(), NCHW)


def test_no_known_key_lists_the_keys(tmp_path: Path) -> None:
    """Several arrays and none with a known key: the error lists the keys."""
    path = save(tmp_path / "odd.npz", foo=NCHW, bar=NCHW)
    with pytest.raises(ItdError, match=r"(foo, bar|bar, foo).*key x"):
        load_data(path)


def test_float_array_is_continuous(tmp_path: Path) -> None:
    """Float arrays load as float32 continuous data, values unchanged."""
    values = np.random.default_rng(1).uniform(-1, 1, size=(3, 2, 5, 6))
    ds = load_data(save(tmp_path / "f.npz", x=values))
    assert ds.levels is None and ds.x.dtype == torch.float32
    assert np.array_equal(ds.values().numpy(), values.astype(np.float32))


def test_float_array_with_levels_is_an_error(tmp_path: Path) -> None:
    """--levels with float data is refused with an explanation."""
    path = save(tmp_path / "f.npz", x=np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ItdError, match=r"continuous.*--levels applies only to integer"):
        load_data(path, levels=256)


def test_integer_array_needs_levels(tmp_path: Path) -> None:
    """int64 data need --levels; with it, values are checked and stored."""
    path = save(tmp_path / "i.npz", x=np.array([[0, 3], [2, 1]], dtype=np.int64))
    with pytest.raises(ItdError, match="--levels"):
        load_data(path)
    ds = load_data(path, levels=4)
    assert ds.x.dtype == torch.uint8 and ds.x.tolist() == [[0, 3], [2, 1]]
    with pytest.raises(ItdError, match=r"up to 3.*--levels 4"):
        load_data(path, levels=3)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    """Object arrays would need pickle, which is never enabled."""
    path = save(tmp_path / "o.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ItdError, match="cannot read"):
        load_data(path)


def test_corrupt_npz_is_an_error(tmp_path: Path) -> None:
    """A file named .npz that is not a zip archive is reported."""
    path = tmp_path / "bad.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(ItdError, match=r"bad\.npz"):
        load_data(path)


def test_unknown_name_lists_the_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare unknown name says it is neither a path nor a registered dataset."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ItdError) as info:
        load_data("foo")
    message = str(info.value)
    assert message.startswith("unknown dataset 'foo': not a file or folder")
    assert "digits_test, digits_train" in message and ".npz" in message and "\n" not in message


@pytest.mark.parametrize("name", ["missing.npz", "some/folder", "~/surely_missing_itd_folder"])
def test_missing_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Strings that look like paths and do not exist say so."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ItdError, match="no such file or folder"):
        load_data(name)


def test_empty_string_is_not_the_current_folder() -> None:
    """An empty source is an error rather than silently meaning '.'."""
    with pytest.raises(ItdError, match="empty"):
        load_data("")


def test_missing_pathlike(tmp_path: Path) -> None:
    """A Path object that does not exist is a missing path, not an unknown name."""
    with pytest.raises(ItdError, match="no such file or folder"):
        load_data(tmp_path / "nothing")


@pytest.mark.parametrize(("name", "words"), [("t.csv", "'.csv'.*npz"), ("one.png", "put it in a folder")])
def test_unsupported_file(tmp_path: Path, name: str, words: str) -> None:
    """Other file types are refused with the list of supported inputs."""
    path = tmp_path / name
    path.write_text("x")
    with pytest.raises(ItdError, match=words):
        load_data(path)


def test_folder_named_like_dataset_wins_only_as_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered name is the bundled dataset even when a same-named folder exists; ./name is the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits_test").mkdir()
    assert len(load_data("digits_test")) == 360
    with pytest.raises(ItdError, match="no images"):
        load_data("./digits_test")
