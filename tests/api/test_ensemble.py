"""`itd ensemble`: one member equals the model, two members are no worse than either, selection is held out."""

from pathlib import Path

import pytest
import torch

import itdcli
from itdcli.api.ensemble import ensemble
from itdcli.cli.main import main

COMMON = {"points": 16, "limit": 120, "seed": 5}


def test_an_ensemble_of_one_model_equals_that_model() -> None:
    alone = itdcli.nll("digits_test", "digits", save=False, adapt=False, **COMMON)  # members share the base proposal
    ens = ensemble("digits_test", ["digits"], save=False, **COMMON)
    for name, e in alone.estimates.items():
        assert ens.ensemble[name].bpd == pytest.approx(e.bpd, abs=1e-5), name


def test_two_members_are_no_worse_than_either_and_better_where_curves_cross() -> None:
    ens = ensemble("digits_test", ["digits", "gaussian"], save=False, **COMMON)
    for name, e in ens.ensemble.items():
        best = min(m[name].bpd for m in ens.members.values())
        assert e.bpd <= best + 0.005, (name, e.bpd, best)
    # the digits model's dequantized curve rises above the Gaussian's at high logSNR: the ensemble takes both
    assert {s.member for s in ens.winners["dequantized"]} >= {"digits", "gaussian"}
    deq_best = min(m["dequantized"].bpd for m in ens.members.values())
    assert ens.ensemble["dequantized"].bpd < deq_best - 0.005


def test_the_choice_depends_only_on_the_selection_data() -> None:
    opts = {"points": 12, "seed": 1, "estimator": "continuous", "select_on": "digits_train", "save": False}
    opts["reference"] = "digits_train"  # the same reference and proposal for both scored sets
    first = ensemble("digits_test", ["digits", "gaussian"], limit=60, **opts)
    other = torch.flip(itdcli.load_data("digits_test").x[:60], dims=[3])  # different images to score
    second = ensemble(other, ["digits", "gaussian"], levels=17, limit=60, **opts)
    assert first.winners == second.winners
    assert first.ensemble["continuous"].bpd != second.ensemble["continuous"].bpd


def test_cli_prints_the_table_and_curve_draws_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ens"
    args = ["ensemble", "digits_test", "--model", "digits", "--model", "gaussian", "--points", "8", "--limit", "40"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0 and "ensemble" in printed and "winners" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["curve", str(out), "--out", str(tmp_path / "ens.pdf")])
    assert exit_info.value.code == 0 and (tmp_path / "ens.pdf").read_bytes().startswith(b"%PDF")


def test_saved_runs_that_do_not_match_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in ("1", "2"):
        itdcli.nll("digits_test", "gaussian", points=4, limit=10, seed=int(seed), out=tmp_path / seed)
    with pytest.raises(SystemExit) as exit_info:
        main(["ensemble", "digits_test", "--run", str(tmp_path / "1"), "--run", str(tmp_path / "2")])
    assert exit_info.value.code == 2 and "do not share" in capsys.readouterr().err


def test_select_on_needs_models_not_saved_runs(tmp_path: Path) -> None:
    from itdcli.errors import ItdError

    itdcli.nll("digits_test", "gaussian", points=4, limit=10, out=tmp_path / "run")
    with pytest.raises(ItdError, match="--select-on"):
        ensemble("digits_test", runs=[tmp_path / "run"], select_on="digits_train")
