"""Pretrained-model workflow end to end with stand-ins placed where `itd download` puts the real files."""

from pathlib import Path

import pytest
from clirun import run
from standins import save_ddpm, save_iddpm, write_cifar

from itdcli import paths


@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One itd home with fake CIFAR-10 and both stand-in models at their download locations."""
    home = tmp_path_factory.mktemp("pretrained-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ITD_HOME", str(home))
        write_cifar(paths.cifar_dir())
        save_iddpm(paths.iddpm_checkpoint("iddpm"))
        save_ddpm(paths.ddpm_dir())
    return home


@pytest.mark.parametrize("model", ["iddpm", "ddpm"])
def test_nll_on_cifar_test_with_a_downloaded_model_prints_bpd(
    model: str, placed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITD_HOME", str(placed))
    code, out, err = run(["nll", "cifar_test", "--model", model, "--discrete", "--points", "3", "--limit", "4"], capsys)
    assert code == 0, err
    assert "discrete" in out and "bits/dim" in out and f"{model} on cifar_test" in out
    assert "trained range" in err  # the default CIFAR range goes beyond what either model was trained on


def test_listing_shows_the_placed_files(
    placed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITD_HOME", str(placed))
    code, out, _ = run(["download", "--list"], capsys)
    assert code == 0 and "cifar10" in out and "missing" in out  # iddpm-hybrid is not there


def test_model_path_and_image_size_mismatch(
    placed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITD_HOME", str(placed))
    checkpoint = str(paths.iddpm_checkpoint("iddpm"))
    code, _, err = run(["nll", "digits_test", "--model", checkpoint], capsys)
    assert code == 2 and "(3, 32, 32)" in err and "(1, 8, 8)" in err and "Traceback" not in err
    code, _, err = run(["nll", "cifar_test", "--model", "iddpm-hybrid"], capsys)
    assert code == 2 and "itd download iddpm-hybrid" in err
