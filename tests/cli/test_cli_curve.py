"""`itd curve`: figures from the latest run, from run folders, or computed; bad figure paths."""

import os
import stat
from pathlib import Path

import pytest
from clirun import run
from PIL import Image

FAST = ["--limit", "30", "--points", "12"]


def test_curve_without_inputs_draws_the_latest_run_as_pdf_and_png(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(["curve", "--out", str(tmp_path / "none.pdf")], capsys)
    assert code == 2 and "no saved itd nll run" in err
    assert run(["nll", "digits_test", *FAST], capsys)[0] == 0
    pdf, png = tmp_path / "fig.pdf", tmp_path / "fig.png"
    assert run(["curve", "--out", str(pdf)], capsys)[0] == 0
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.read_bytes().rstrip().endswith(b"%%EOF")
    code, out, _ = run(["curve", "--out", str(png), "--json"], capsys)
    assert code == 0 and '"gaussian (rounded)"' in out and '"N(μ,Σ) reference"' in out
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_curve_from_run_folders_and_by_computing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for seed in ("1", "2"):
        assert run(["nll", "digits_test", *FAST, "--seed", seed, "--out", str(tmp_path / seed)], capsys)[0] == 0
    svg = tmp_path / "two.svg"
    code, out, _ = run(["curve", str(tmp_path / "1"), str(tmp_path / "2"), "--out", str(svg), "--json"], capsys)
    assert code == 0 and out.count("(dequantized)") == 2
    assert svg.read_text().lstrip().startswith("<?xml") and "</svg>" in svg.read_text()
    fresh = tmp_path / "fresh.png"
    args = ["curve", "--model", "gaussian", "--data", "digits_test", *FAST, "--out", str(fresh)]
    assert run(args, capsys)[0] == 0 and fresh.stat().st_size > 1000


def test_bad_figure_paths(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["nll", "digits_test", *FAST], capsys)[0] == 0
    code, _, err = run(["curve", "--out", str(tmp_path / "fig.jpg")], capsys)
    assert code == 2 and ".pdf, .png or .svg" in err
    taken = tmp_path / "taken.pdf"
    taken.write_bytes(b"mine")
    code, _, err = run(["curve", "--out", str(taken)], capsys)
    assert code == 2 and "--overwrite" in err and taken.read_bytes() == b"mine"
    code, _, err = run(["curve", "--model", "gaussian", "--out", str(tmp_path / "x.pdf")], capsys)
    assert code == 2 and "--data" in err
    code, _, err = run(["curve", str(tmp_path), "--out", str(tmp_path / "y.pdf")], capsys)
    assert code == 2 and "not an itd run folder" in err


def test_curve_series_are_drawn_in_logsnr_order_when_rounds_interleave_columns() -> None:
    """Columns of two rounds (0, 2, 4 then 1, 3, 5) must be drawn by logSNR, not by column."""
    import torch

    from itdcli import plot

    logsnr = torch.tensor([[0.0, 2.0, 4.0, 1.0, 3.0, 5.0]]).repeat(3, 1)
    err = logsnr * 10
    eig = torch.ones(4, dtype=torch.float64)
    saved = {"index": torch.arange(3), "logsnr": logsnr, "weight": logsnr, "groups": torch.arange(6), "mse/model": err}
    runs = plot.run_series("m", saved, 4, False)
    ens = plot.ensemble_series({"ensemble/logsnr": logsnr, "ensemble/dequantized": err}, eig)
    for series in (runs[0], ens[0][0], ens[0][1]):
        assert torch.equal(series.logsnr, torch.arange(6, dtype=torch.float64))
    assert torch.equal(ens[0][0].mse, torch.arange(6, dtype=torch.float64) * 10 / 4)


def test_figures_and_ensemble_folders_follow_the_umask(tmp_path: Path) -> None:
    """A figure is not left at mkstemp's 0600 and an ensemble's members/ keeps its execute bit (umask 022)."""
    import itdcli

    old = os.umask(0o022)
    try:
        itdcli.ensemble("digits_test", ["gaussian"], points=4, limit=8, out=tmp_path / "ens")
        figure = itdcli.curve([tmp_path / "ens"], out=tmp_path / "fig.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(figure.path).st_mode) == 0o644
    members = tmp_path / "ens" / "members"
    assert stat.S_IMODE(members.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) in (0o644, 0o755) for p in members.rglob("*"))
