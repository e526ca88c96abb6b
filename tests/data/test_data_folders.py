"""Tests of loading image folders written with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itdcli.data import load_data
from itdcli.errors import ItdError


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write HxW (grey) or HxWx3 (RGB) uint8 pixels as an image (format from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else None)


def random_pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_grey_folder_gives_one_channel(tmp_path: Path) -> None:
    """Mode-L PNGs load as (N, 1, H, W) uint8 with 256 levels, pixels exact."""
    pics = [random_pixels(i, (5, 7)) for i in range(3)]
    pics[0][0, 0], pics[0][0, 1] = 0, 255
    for i, pic in enumerate(pics):
        write_png(tmp_path / f"img_{i}.png", pic)
    ds = load_data(tmp_path)
    assert ds.x.shape == (3, 1, 5, 7) and ds.levels == 256 and ds.train is None
    assert np.array_equal(ds.x[:, 0].numpy(), np.stack(pics))
    assert ds.name == str(tmp_path)


def test_rgb_folder_gives_three_channels(tmp_path: Path) -> None:
    """RGB PNGs load as NCHW with channels in R, G, B order."""
    pics = [random_pixels(10 + i, (4, 6, 3)) for i in range(2)]
    for i, pic in enumerate(pics):
        write_png(tmp_path / f"{i}.png", pic)
    ds = load_data(str(tmp_path))
    assert ds.x.shape == (2, 3, 4, 6)
    assert np.array_equal(ds.x.numpy(), np.stack(pics).transpose(0, 3, 1, 2))


def test_mixed_grey_and_rgb_becomes_rgb(tmp_path: Path) -> None:
    """One RGB image makes the whole folder RGB; grey images are repeated over channels."""
    grey, rgb = random_pixels(1, (3, 3)), random_pixels(2, (3, 3, 3))
    write_png(tmp_path / "a.png", grey)
    write_png(tmp_path / "b.png", rgb)
    ds = load_data(tmp_path)
    assert ds.x.shape == (2, 3, 3, 3)
    assert all(np.array_equal(ds.x[0, c].numpy(), grey) for c in range(3))
    assert np.array_equal(ds.x[1].numpy(), rgb.transpose(2, 0, 1))


def test_rgba_and_palette_become_rgb(tmp_path: Path) -> None:
    """RGBA and palette images are converted to RGB as PIL does."""
    rgba = random_pixels(3, (2, 2, 4))
    write_png(tmp_path / "a.png", rgba)
    Image.fromarray(random_pixels(4, (2, 2, 3))).convert("P").save(tmp_path / "b.gif")
    ds = load_data(tmp_path)
    assert ds.x.shape == (2, 3, 2, 2)
    assert np.array_equal(ds.x[0].numpy(), rgba[..., :3].transpose(2, 0, 1))


def test_order_is_by_relative_path_recursively(tmp_path: Path) -> None:
    """Files are sorted by relative path component by component, any image suffix case, hidden skipped."""
    names = ["b/a.png", "a/z.PNG", "a.png", "a-b/x.bmp", "c.jpg", "a/y/q.tif"]
    for i, name in enumerate(names):
        write_png(tmp_path / name, np.full((8, 8), 10 * (i + 1), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    write_png(tmp_path / ".hidden.png", np.zeros((2, 2), dtype=np.uint8))
    write_png(tmp_path / ".git" / "x.png", np.zeros((2, 2), dtype=np.uint8))
    ds = load_data(tmp_path)
    # folder by folder, as a sorted recursive listing gives (plain string sorting would differ)
    order = ["a/y/q.tif", "a/z.PNG", "a-b/x.bmp", "a.png", "b/a.png", "c.jpg"]
    expected = [10 * (names.index(name) + 1) for name in order]
    assert [int(v) for v in ds.x[:, 0, 0, 0]] == expected


def test_levels_override_is_validated(tmp_path: Path) -> None:
    """A folder may use fewer levels if every pixel fits, else it is an error naming the fix."""
    write_png(tmp_path / "a.png", np.array([[0, 16]], dtype=np.uint8))
    ds = load_data(tmp_path, levels=17)
    assert ds.levels == 17 and ds.values()[0, 0, 0, 1].item() == 1.0
    with pytest.raises(ItdError, match="--levels 17"):
        load_data(tmp_path, levels=16)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    """A folder without images is an error that says what to put there."""
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ItdError, match="no images found"):
        load_data(tmp_path)


def test_mixed_sizes_name_both_files(tmp_path: Path) -> None:
    """Images of two sizes: the error names both files and sizes."""
    write_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    write_png(tmp_path / "b.png", np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(ItdError, match=r"a\.png is 4x4 but .*b\.png is 5x4.*resize"):
        load_data(tmp_path)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    """A corrupt image file is reported by name."""
    write_png(tmp_path / "a.png", np.zeros((2, 2), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ItdError, match=r"cannot read image .*broken\.png"):
        load_data(tmp_path)


def test_sixteen_bit_images_are_refused(tmp_path: Path) -> None:
    """16-bit images would lose precision silently, so they are an error."""
    Image.fromarray(np.full((2, 2), 1000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ItdError, match="8-bit"):
        load_data(tmp_path)
