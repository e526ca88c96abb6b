"""`itd nll` end to end: the table, --json, run records, --out handling."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run

FAST = ["--limit", "40", "--points", "16"]


def test_readme_main_job_prints_finite_bpd_for_every_estimator(itd_home: Path) -> None:
    """The acceptance command, through the real console script."""
    cmd = [sys.executable, "-m", "itdcli", "nll", "digits_test", "--model", "gaussian", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert set(result["estimates"]) == {"discrete", "dequantized"}  # the continuous density only on request
    assert all(math.isfinite(e["bpd"]) and e["stderr_bpd"] > 0 for e in result["estimates"].values())
    assert result["data"]["n_images"] == 360 and result["data"]["levels"] == 17
    assert Path(result["run_dir"], "result.json").exists()
    # discrete −log P is bounded by log2(17) bits/dim and by the dequantized bound in expectation
    est = result["estimates"]
    assert 0 < est["discrete"]["bpd"] < math.log2(17)
    assert est["discrete"]["bpd"] < est["dequantized"]["bpd"] + 3 * est["dequantized"]["stderr_bpd"]


def test_table_names_the_estimators_and_the_saved_run(capsys: pytest.CaptureFixture[str], itd_home: Path) -> None:
    code, out, _ = run(["nll", "digits_test", *FAST], capsys)
    assert code == 0
    for word in ("discrete", "dequantized", "bits/dim", "logSNR range", "tails", "saved run"):
        assert word in out
    assert (itd_home / "latest-run").read_text().strip() in out


def test_discrete_flag_reports_only_the_discrete_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["nll", "digits_test", "--discrete", "--json", *FAST], capsys)
    assert code == 0
    assert list(json.loads(out)["estimates"]) == ["discrete"]


def test_out_writes_a_complete_record_and_refuses_to_overwrite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_dir = tmp_path / "run"
    code, _, _ = run(["nll", "digits_test", *FAST, "--out", str(out_dir)], capsys)
    assert code == 0
    result = json.loads((out_dir / "result.json").read_text())
    for key in ("loc", "scale", "scale_constant", "clip", "logsnr_min", "logsnr_max", "scheme"):
        assert key in result["proposal"]
    assert result["points"] == 16 and result["seed"] == 0 and result["data"]["sha256"]
    from safetensors.torch import load_file

    arrays = load_file(str(out_dir / "arrays.safetensors"))
    assert arrays["bpd/discrete"].shape == (40,) and arrays["mse/round"].shape == (40, 16)
    before = (out_dir / "result.json").read_bytes()
    code, _, err = run(["nll", "digits_test", *FAST, "--out", str(out_dir)], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out_dir / "result.json").read_bytes() == before
    code, _, _ = run(["nll", "digits_test", *FAST, "--seed", "3", "--out", str(out_dir), "--overwrite"], capsys)
    assert code == 0 and json.loads((out_dir / "result.json").read_text())["seed"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_python_api_matches_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    import itdcli

    code, out, _ = run(["nll", "digits_test", "--json", *FAST], capsys)
    assert code == 0
    api = itdcli.nll("digits_test", "gaussian", limit=40, points=16, save=False)
    cli = json.loads(out)
    for name, e in api.estimates.items():
        assert e.bpd == pytest.approx(cli["estimates"][name]["bpd"], rel=1e-12)


def test_help_does_not_import_torch() -> None:
    code = "import sys; from itdcli.cli.main import app; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
    helptext = subprocess.run([sys.executable, "-m", "itdcli", "--help"], capture_output=True, text=True, check=True)
    assert "nll" in helptext.stdout and "curve" in helptext.stdout


def test_performance_options_reach_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    """--target-stderr, --no-adapt, --no-control-variate, --precision, --draws from the command line."""
    args = ["nll", "digits_test", "--model", "gaussian", "--limit", "60", "--json", "--no-adapt"]
    code, out, _ = run([*args, "--target-stderr", "0.05", "--no-control-variate", "--precision", "fp32"], capsys)
    result = json.loads(out)
    assert code == 0 and result["target_stderr_bpd"] == 0.05 and result["proposal"]["kind"] == "logistic"
    assert all(e["stderr_bpd"] <= 0.05 for e in result["estimates"].values())
    assert result["precision"].startswith("float32")
    code, out, _ = run([*args, "--points", "8", "--draws", "2"], capsys)
    result = json.loads(out)
    assert code == 0 and result["draws"] == 2 and result["target_stderr_bpd"] is None
    assert result["evals_per_image"] == 8 * 2 * 2  # points × draws × (x and dequantized x)


def test_overwrite_never_deletes_what_itd_did_not_write(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--overwrite` on a folder of the user's is refused in one line naming the foreign file, which survives."""
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "thesis.tex").write_text("x\n")
    code, _, err = run(["nll", "digits_test", *FAST, "--out", str(user), "--overwrite"], capsys)
    assert code == 2 and "thesis.tex" in err and len(err.strip().splitlines()) == 1
    assert (user / "thesis.tex").read_text() == "x\n"
    code, _, err = run(["nll", "digits_test", *FAST, "--out", str(tmp_path), "--overwrite"], capsys)
    assert code == 2 and "userdir" in err and (user / "thesis.tex").exists()


def test_estimator_help_and_choices_come_from_one_registry_that_names_every_estimator() -> None:
    """Adding an estimator is its UNITS or SOLVERS entry and its name in core/kinds.py; the help follows."""
    from typing import get_args

    from itdcli.core.kinds import ESTIMATOR_HELP, EstimatorChoice
    from itdcli.evaluation.units import SOLVERS, UNITS

    assert list(get_args(EstimatorChoice)) == list(ESTIMATOR_HELP)
    public = {n for n in UNITS if n != "continuous_pointwise"} | set(SOLVERS)  # the pointwise form rides along
    assert public | {"immse", "all"} == set(ESTIMATOR_HELP)
    assert all(name in _nll_help_words() for name in ESTIMATOR_HELP)


def test_model_help_names_every_registered_model() -> None:
    from itdcli.core.kinds import MODEL_NAMES
    from itdcli.models.registry import REGISTRY

    assert set(MODEL_NAMES) == set(REGISTRY)
    assert all(name in _nll_help_words() for name in MODEL_NAMES)


def _nll_help_words() -> str:
    """`itd nll --help` from the real entry point, with spaces, line breaks and box rules removed (it wraps at
    hyphens)."""
    env = {**os.environ, "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "itdcli", "nll", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return "".join(proc.stdout.replace("│", " ").split())
