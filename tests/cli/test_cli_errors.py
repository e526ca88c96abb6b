"""Bad input: one line on stderr, exit code 2, never a traceback; Ctrl-C leaves nothing behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itdcli.cli.main import main


def fails(args: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Assert `itd ARGS` exits 2 with a single error line containing every word; return the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    _, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> str:
    """Write a user model module in a fresh working directory; return its module:attribute spec."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.chdir(tmp_path)
    return f"{name}:model"


def test_unknown_dataset_lists_the_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    fails(["nll", "cifar_moon"], capsys, "cifar_moon", "digits_test", "digits_train")


def test_unknown_model_lists_the_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    fails(["nll", "digits_test", "--model", "unet9000"], capsys, "unet9000", "gaussian", "module.path:attribute")


def test_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(["nll", str(tmp_path / "nowhere" / "x.npz")], capsys, "no such file")


def test_folder_without_images(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    fails(["nll", str(tmp_path)], capsys, "no images")


def test_images_of_mixed_sizes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "b.png")
    fails(["nll", str(tmp_path)], capsys, "size")


def test_discrete_on_float_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "float.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    fails(["nll", str(path), "--discrete"], capsys, "discrete", "float")


def test_points_zero(capsys: pytest.CaptureFixture[str]) -> None:
    fails(["nll", "digits_test", "--points", "0"], capsys, "--points")


def test_existing_and_unwritable_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    fails(["nll", "digits_test", "--out", str(tmp_path / "taken")], capsys, "already exists", "--overwrite")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions; a file in the way is unwritable for everyone
        (tmp_path / "file").write_text("")
        locked = tmp_path / "file"
    fails(["nll", "digits_test", "--out", str(locked / "run")], capsys, "cannot write")


def test_denoiser_returning_the_wrong_shape(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _module(tmp_path, monkeypatch, "wrong_shape_model", "def model(z, logsnr):\n    return z[:, :, :4]\n")
    fails(["nll", "digits_test", "--model", spec, "--limit", "4", "--points", "4"], capsys, "shape", "(")


def test_denoiser_returning_nan_names_the_logsnr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = """
    import torch
    def model(z, logsnr):
        out = torch.zeros_like(z)
        out[logsnr > 5] = float("nan")
        return out
    """
    spec = _module(tmp_path, monkeypatch, "nan_model", body)
    line = fails(["nll", "digits_test", "--model", spec, "--limit", "4", "--points", "8"], capsys, "NaN", "logSNR")
    value = float(line.split("logSNR ")[1].split()[0].rstrip(",;"))
    assert value > 5


def test_user_module_factory_and_callable_both_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = """
    import torch
    class Zero(torch.nn.Module):
        def forward(self, z, logsnr):
            return torch.zeros_like(z)
    def model():
        return Zero()
    """
    spec = _module(tmp_path, monkeypatch, "factory_model", body)
    with pytest.raises(SystemExit) as exit_info:
        main(["nll", "digits_test", "--model", spec, "--limit", "4", "--points", "4", "--json"])
    assert exit_info.value.code == 0
    assert '"discrete"' in capsys.readouterr().out


def test_debug_mode_shows_the_traceback(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITD_DEBUG", "1")
    from itdcli.errors import ItdError

    with pytest.raises(ItdError):
        main(["nll", "cifar_moon"])


def test_ctrl_c_exits_130_and_leaves_no_partial_files(tmp_path: Path) -> None:
    (tmp_path / "slow_model.py").write_text(
        "import pathlib, time, torch\n"
        "def model(z, logsnr):\n"
        "    pathlib.Path('started').touch()\n"
        "    time.sleep(0.2)\n"
        "    return torch.zeros_like(z)\n"
    )
    out = tmp_path / "results"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "itdcli",
        "nll",
        "digits_test",
        "--model",
        "slow_model:model",
        "--batch-size",
        "8",
        "--out",
        str(out / "run"),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:  # interrupt mid-evaluation
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_the_python_api_raises_itd_errors_naming_the_field_and_refuses_booleans_and_contradictions(
    tmp_path: Path,
) -> None:
    import itdcli
    from itdcli.errors import ItdOptionError

    cases = [({"points": True}, "points"), ({"points": -3}, "points"), ({"selection": "best"}, "selection")]
    cases += [({"out": tmp_path / "r", "save": False}, "options"), ({"seed": False}, "seed")]
    for options, field in cases:
        with pytest.raises(ItdOptionError) as info:
            itdcli.nll("digits_test", "gaussian", **options)
        assert info.value.field == field, (options, info.value)
    assert not (tmp_path / "r").exists()


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from itdcli import __version__
    from itdcli.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"itd {__version__}"


def test_one_image_gets_advice_that_works_and_a_numpy_model_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import itdcli
    from itdcli.errors import ItdError

    path = tmp_path / "one.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, (1, 1, 4, 4)).astype(np.uint8))
    with pytest.raises(SystemExit) as info:
        main(["nll", str(path), "--points", "8"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "at least two" in err and "--reference standard-normal" in err
    with pytest.raises(SystemExit) as info:  # the advice, followed
        main(["nll", str(path), "--points", "8", "--reference", "standard-normal"])
    assert info.value.code == 0

    def numpy_model(z: torch.Tensor, logsnr: torch.Tensor) -> np.ndarray:
        return np.zeros(tuple(z.shape), dtype=np.float32)

    with pytest.raises(ItdError, match=r"returned a numpy\.ndarray, not a torch\.Tensor"):
        itdcli.nll("digits_test", numpy_model, points=4, limit=4, save=False)

    def float64_model(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return torch.zeros(z.shape, dtype=torch.float64)

    run = itdcli.nll("digits_test", float64_model, points=4, limit=4, save=False)
    assert all(np.isfinite(e.bpd) for e in run.estimates.values())
