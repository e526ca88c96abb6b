"""Tests of the CIFAR-10 readers on fake copies: pickles (restricted unpickler, md5s) and PNG folders."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itdcli import paths
from itdcli.data import dataset_names, load_data
from itdcli.data.cifar import (
    CIFAR_MD5S,
    MANIFEST,
    PNG_CLASSES,
    is_cifar_png_folder,
    load_cifar_batches,
    load_cifar_png_folder,
)
from itdcli.errors import ItdError

N = 20
BATCH_FILES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Writes every str and bytes as a Python-2 string (BINSTRING), as the published batches were written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        """Emit SHORT_BINSTRING / BINSTRING, which encoding='bytes' reads back as bytes."""
        size = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<i", size)
        self.write(head + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        """A str is written as its latin-1 bytes, as Python 2 had it."""
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def dumps(obj: object, style: str) -> bytes:
    """Protocol-2 pickle: 'str' keys, 'bytes' keys, or 'py2' (all strings as bytes, numpy.core global name)."""
    if style != "py2":
        return pickle.dumps(obj, protocol=2)
    out = io.BytesIO()
    Py2Pickler(out, protocol=2).dump(obj)
    return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def fake_batches() -> dict[str, tuple[np.ndarray, list[int]]]:
    """Seeded rows (N, 3072) and labels for the six batch files; pixels include 0 and 255."""
    rng = np.random.default_rng(0)
    batches = {}
    for k, name in enumerate(BATCH_FILES):
        rows = rng.integers(0, 256, size=(N, 3072), dtype=np.uint8)
        rows[0, 0], rows[1, 1] = 0, 255
        rows[:, 0] = np.arange(N) + N * k  # image i of the split is recognisable from its first pixel
        batches[name] = (rows, [int(v) for v in rng.integers(0, 10, size=N)])
    return batches


def write_fake(folder: Path, style: str = "str", manifest: bool = False) -> dict[str, str]:
    """Write a fake cifar-10-batches-py/ (six batches and batches.meta); return the md5s of its files."""
    folder.mkdir(parents=True)
    for name, (rows, labels) in fake_batches().items():
        label = "testing batch 1 of 1" if name == "test_batch" else f"training batch {name[-1]} of 5"
        batch = {"data": rows, "labels": labels, "batch_label": label, "filenames": [f"f{i}.png" for i in range(N)]}
        if style == "bytes":
            batch = {key.encode(): value for key, value in batch.items()}
        (folder / name).write_bytes(dumps(batch, style))
    meta = {"label_names": LABEL_NAMES, "num_cases_per_batch": N, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(dumps(meta, style))
    md5s = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in [*BATCH_FILES, "batches.meta"]}
    if manifest:
        (folder / MANIFEST).write_text(json.dumps(md5s))
    return md5s


def expected_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fake split's rows (n, 3072) and labels, concatenated in batch order."""
    batches = fake_batches()
    names = BATCH_FILES[:5] if split == "train" else ["test_batch"]
    return np.concatenate([batches[n][0] for n in names]), np.concatenate([batches[n][1] for n in names])


@pytest.mark.parametrize("style", ["str", "bytes", "py2"])
def test_fake_pickles_load_in_batch_order(tmp_path: Path, style: str) -> None:
    """Both splits load as uint8 NCHW with int64 labels in batch order, for str, bytes and Python-2 pickles."""
    folder = tmp_path / "cifar-10-batches-py"
    md5s = write_fake(folder, style)
    for split, size in [("train", 5 * N), ("test", N)]:
        images, labels = load_cifar_batches(folder, split, md5s=md5s)  # type: ignore[arg-type]
        rows, want_labels = expected_split(split)
        assert images.shape == (size, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64 and labels.tolist() == want_labels.tolist()
        assert np.array_equal(images.reshape(size, -1).numpy(), rows)


def test_nchw_layout_is_red_then_green_then_blue_planes(tmp_path: Path) -> None:
    """Row values 0..1023 are the red plane row-major, 1024..2047 green, 2048..3071 blue."""
    folder = tmp_path / "cifar-10-batches-py"
    write_fake(folder)
    images, _ = load_cifar_batches(folder, "test", verify=False)
    rows = expected_split("test")[0]
    assert images[3, 0, 0, 5].item() == rows[3, 5]
    assert images[3, 1, 2, 7].item() == rows[3, 1024 + 2 * 32 + 7]
    assert images[3, 2, 31, 31].item() == rows[3, 3071]
    assert int(images.min()) == 0 and int(images.max()) == 255


def test_published_md5s_reject_a_fake_copy(tmp_path: Path) -> None:
    """Default verification fails on a fake, naming the file and the ways out."""
    folder = tmp_path / "cifar-10-batches-py"
    md5s = write_fake(folder)
    with pytest.raises(ItdError) as err:
        load_cifar_batches(folder, "test")
    message = str(err.value)
    assert str(folder / "test_batch") in message and md5s["test_batch"] in message
    assert CIFAR_MD5S["test_batch"] in message
    assert "itd download cifar10 --force" in message and "verify=False" in message


def test_md5_override_mismatch_and_missing_file(tmp_path: Path) -> None:
    """A wrong override fails; a missing batch file is named with the re-download hint."""
    folder = tmp_path / "cifar-10-batches-py"
    md5s = write_fake(folder)
    with pytest.raises(ItdError, match="data_batch_3 has md5"):
        load_cifar_batches(folder, "train", md5s={**md5s, "data_batch_3": "0" * 32})
    (folder / "data_batch_5").unlink()
    with pytest.raises(ItdError, match=r"missing .*data_batch_5.*itd download cifar10 --force"):
        load_cifar_batches(folder, "train", verify=False)


class Marker:
    """A class the restricted unpickler must refuse, whatever it would do."""


def unicode_op(text: str) -> bytes:
    """The BINUNICODE opcode pushing `text`."""
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def crafted_pickle(target: Path) -> bytes:
    """A protocol-2 pickle of {'data': builtins.open(target, 'w')}: loading it freely creates the file."""
    call = (
        pickle.GLOBAL + b"builtins\nopen\n" + unicode_op(str(target)) + unicode_op("w") + pickle.TUPLE2 + pickle.REDUCE
    )
    return (
        pickle.PROTO
        + b"\x02"
        + pickle.EMPTY_DICT
        + pickle.MARK
        + unicode_op("data")
        + call
        + pickle.SETITEMS
        + pickle.STOP
    )


def test_disallowed_global_is_refused_without_running(tmp_path: Path) -> None:
    """A pickle that would create a file via builtins.open is refused, and the file is never created."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    control = tmp_path / "control"
    pickle.loads(crafted_pickle(control))["data"].close()  # unrestricted unpickling runs open(): the file appears
    assert control.exists()
    target = tmp_path / "pwned"
    payload = crafted_pickle(target)
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(ItdError) as err:
        load_cifar_batches(folder, "test", verify=False)
    assert str(err.value) == (
        f"refusing to unpickle builtins.open from {folder / 'test_batch'}: "
        "CIFAR-10 batches contain only arrays, lists and strings"
    )
    assert not target.exists()


def test_a_pickled_class_instance_is_refused(tmp_path: Path) -> None:
    """Any other global, such as a class, is refused too."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Marker()}, protocol=2))
    with pytest.raises(ItdError, match=r"refusing to unpickle .*Marker from"):
        load_cifar_batches(folder, "test", verify=False)


def test_damaged_or_wrong_batches_raise_itd_errors(tmp_path: Path) -> None:
    """Truncated pickles and dicts without CIFAR-10 entries give one-line errors."""
    folder = tmp_path / "cifar-10-batches-py"
    write_fake(folder)
    raw = (folder / "test_batch").read_bytes()
    bad: list[tuple[bytes, str]] = [
        (raw[: len(raw) // 2], "cannot read"),
        (pickle.dumps({"labels": [1]}, protocol=2), "no 'data' entry"),
        (pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, protocol=2), "'data' is uint8"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, protocol=2), "'labels'"),
    ]
    for payload, message in bad:
        (folder / "test_batch").write_bytes(payload)
        with pytest.raises(ItdError, match=message):
            load_cifar_batches(folder, "test", verify=False)


def write_pngs(folder: Path, split: str) -> None:
    """Write the fake split as improved-diffusion PNGs `{CLASS}_{i:05d}.png`."""
    rows, labels = expected_split(split)
    folder.mkdir(parents=True)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        pixels = row.reshape(3, 32, 32).transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"{PNG_CLASSES[label]}_{i:05d}.png")


def test_png_folder_reproduces_the_pickles_in_pickle_order(tmp_path: Path) -> None:
    """The PNG loader, mapped back through i, gives the pickle pixels; its order is by i, not by path."""
    write_pngs(tmp_path / "cifar_train", "train")
    images, labels, indices = load_cifar_png_folder(tmp_path / "cifar_train")
    rows, want_labels = expected_split("train")
    assert indices.tolist() == list(range(5 * N)) and labels.tolist() == want_labels.tolist()
    assert images.dtype == torch.uint8 and np.array_equal(images.reshape(5 * N, -1).numpy(), rows)
    assert torch.equal(load_data(tmp_path / "cifar_train").x, images)
    assert sorted(p.name for p in (tmp_path / "cifar_train").iterdir()) != [
        f"{PNG_CLASSES[label]}_{i:05d}.png" for i, label in enumerate(want_labels)
    ]


def test_png_folder_as_data_source_and_train_sibling(tmp_path: Path) -> None:
    """load_data on cifar_test gives pickle order, 256 levels, and the cifar_train sibling as train."""
    write_pngs(tmp_path / "cifar_test", "test")
    alone = load_data(tmp_path / "cifar_test")
    assert alone.name == str(tmp_path / "cifar_test") and alone.levels == 256 and alone.train is None
    assert np.array_equal(alone.x.reshape(N, -1).numpy(), expected_split("test")[0])
    write_pngs(tmp_path / "cifar_train", "train")
    with_train = load_data(tmp_path / "cifar_test")
    assert with_train.train == str((tmp_path / "cifar_train").resolve())
    assert len(load_data(with_train.train)) == 5 * N


def test_png_folder_rules(tmp_path: Path) -> None:
    """Duplicate indices are an error; a stray file name makes it an ordinary image folder."""
    write_pngs(tmp_path / "pngs", "test")
    (tmp_path / "pngs" / "sub").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "pngs" / "sub" / "cat_00003.png")
    with pytest.raises(ItdError, match="both have index 3"):
        load_data(tmp_path / "pngs")
    (tmp_path / "pngs" / "sub" / "cat_00003.png").rename(tmp_path / "pngs" / "sub" / "other.png")
    assert not is_cifar_png_folder(tmp_path / "pngs")
    assert len(load_data(tmp_path / "pngs")) == N + 1


def test_registry_names_read_the_itd_home(tmp_path: Path) -> None:
    """cifar_test/cifar_train load from <ITD_HOME>/data, verified against .itd-md5.json, train='cifar_train'."""
    assert {"cifar_train", "cifar_test"} <= set(dataset_names())
    write_fake(paths.cifar_dir(), manifest=True)
    test = load_data("cifar_test")
    assert (test.name, len(test), test.shape, test.levels, test.train) == (
        "cifar_test",
        N,
        (3, 32, 32),
        256,
        "cifar_train",
    )
    assert np.array_equal(test.x.reshape(N, -1).numpy(), expected_split("test")[0])
    train = load_data("cifar_train", levels=256)
    assert (train.name, len(train), train.train) == ("cifar_train", 5 * N, "cifar_train")
    with pytest.raises(ItdError, match="has 256 levels"):
        load_data("cifar_test", levels=17)


def test_registry_verifies_published_md5s_without_a_manifest() -> None:
    """Without .itd-md5.json the fake fails the published checksums."""
    write_fake(paths.cifar_dir())
    with pytest.raises(ItdError, match="test_batch has md5 .* expected " + CIFAR_MD5S["test_batch"]):
        load_data("cifar_test")


def test_registry_missing_folder_tells_to_download() -> None:
    """With nothing downloaded the error names the command and the folder."""
    with pytest.raises(ItdError) as err:
        load_data("cifar_train")
    assert str(err.value) == (
        f"CIFAR-10 is not downloaded: run `itd download cifar10` (or place cifar-10-batches-py/ at {paths.cifar_dir()})"
    )


def test_batches_folder_as_a_path_and_split_suffix(tmp_path: Path) -> None:
    """A batches folder path loads the test split with train '<folder>:train'; ':train' and ':test' pick splits."""
    folder = tmp_path / "cifar-10-batches-py"
    write_fake(folder, manifest=True)
    test = load_data(folder)
    assert (test.name, len(test), test.levels, test.train) == (f"{folder}:test", N, 256, f"{folder}:train")
    assert load_data(f"{folder}:test") == test
    train = load_data(test.train or "")
    assert (train.name, len(train), train.train) == (f"{folder}:train", 5 * N, f"{folder}:train")
    with pytest.raises(ItdError, match="holds neither test_batch nor data_batch_1"):
        load_data(f"{tmp_path}:train")


def test_bad_manifest_is_an_itd_error(tmp_path: Path) -> None:
    """A manifest that is not a JSON object of strings is reported."""
    folder = tmp_path / "cifar-10-batches-py"
    write_fake(folder)
    (folder / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ItdError, match="must be a JSON object"):
        load_data(folder)


def test_codecs_encode_is_admitted_for_latin1_only(tmp_path: Path) -> None:
    """`_codecs.encode`, which Python 3 protocol-2 pickles use for bytes, may not run other codecs."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    call = pickle.GLOBAL + b"_codecs\nencode\n" + unicode_op("x") + unicode_op("zlib") + pickle.TUPLE2 + pickle.REDUCE
    (folder / "test_batch").write_bytes(pickle.PROTO + b"\x02" + call + pickle.STOP)
    with pytest.raises(ItdError, match="admitted only for latin-1 text, got encoding 'zlib'"):
        load_cifar_batches(folder, "test", verify=False)
