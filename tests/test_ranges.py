"""The range from the closed-form tails, warnings for user ranges, references on the data's scale, named modes."""

import math

import pytest
import torch

import itdcli
from itdcli.core import tails
from itdcli.errors import ItdError

FAST = {"points": 8, "limit": 40, "seed": 2, "save": False, "adapt": False}


def test_the_default_range_puts_every_tail_at_a_tenth_of_the_target() -> None:
    run = itdcli.nll("digits_test", "digits", **FAST)
    assert set(run.estimates) == {"discrete", "dequantized"}
    limit = 0.1 * 0.005
    for t in run.tails.values():
        assert t.limit_bpd == pytest.approx(limit)
        assert t.left_bpd == pytest.approx(limit, rel=1e-6) and 0 <= t.right_bpd <= limit * (1 + 1e-6)
    # the left end solves ½ Σ softplus(γ_L + log λ) = limit · d ln 2, computed here from the saved spectrum
    lam = run.arrays["eigvals"].double()
    left = 0.5 * float(torch.nn.functional.softplus(run.proposal.logsnr_min + lam.log()).sum())
    assert left == pytest.approx(limit * 64 * math.log(2), rel=1e-6)
    assert not run.warnings


def test_a_user_range_that_leaves_a_tail_above_its_limit_is_warned_with_its_size() -> None:
    run = itdcli.nll("digits_test", "digits", estimator="discrete", logsnr_max=5.0, **FAST)
    (line,) = [w for w in run.warnings if "right tail" in w]
    size = run.tails["discrete"].right_bpd
    assert f"{size:.4f} bpd" in line and size > 0.1
    # the reported tail is the exact rounding tail of the scored images, in bpd
    x = itdcli.load_data("digits_test").x[run.arrays["index"]]
    exact = float(tails.rounding_tail(5.0, x, 17).mean()) / (64 * math.log(2))
    assert size == pytest.approx(exact, rel=1e-9)


def test_a_target_so_loose_that_the_tails_alone_meet_it_falls_back_to_the_papers_range() -> None:
    """--target-stderr 50: every tail is below 5 bpd at any range, so the tails cannot place the ends."""
    run = itdcli.nll("digits_test", "digits", estimator="discrete", target_stderr=50.0, limit=8, seed=0, save=False)
    p = run.proposal
    assert p.logsnr_min == pytest.approx(p.loc - 4 * p.scale) and p.logsnr_max == pytest.approx(p.loc + 4 * p.scale)
    assert run.estimates["discrete"].stderr_bpd is not None


def test_an_integer_reference_is_read_at_the_datas_levels_and_another_scale_is_refused() -> None:
    test, train = itdcli.load_data("digits_test"), itdcli.load_data("digits_train")
    opts = {**FAST, "estimator": "discrete", "levels": 17}
    as_arrays = itdcli.nll(test.x, "digits", reference=train.x, **opts)
    named = itdcli.nll(test.x, "digits", reference="digits_train", **opts)
    assert as_arrays.estimates["discrete"].bpd == pytest.approx(named.estimates["discrete"].bpd, abs=1e-9)
    with pytest.raises(ItdError, match="float values but the scored data hold 17 levels"):
        itdcli.nll(test.x, "digits", reference=train.values(), **opts)


@pytest.mark.slow
def test_the_papers_clamp_is_named_as_such_and_switches_among_the_papers_candidates() -> None:
    own = itdcli.nll("digits_test", "digits", **FAST)
    paper = itdcli.nll("digits_test", "digits", paper_clamp=True, **FAST)
    assert own.bound == "model" and paper.bound == "paper-clamp"
    assert set(paper.estimates) == {"discrete_paper_clamp", "dequantized_paper_clamp"}
    assert paper.candidates["dequantized"] == ["deq", "gauss_deq"]  # the paper's rule: no cell refinement
    assert own.candidates["dequantized"] == ["deq", "deq_cell"] and own.candidates["discrete"] == ["round", "model"]
    assert paper.candidates["discrete"] == ["round", "model", "gauss"]
    # the switch adds N(μ,Σ) to the same discrete candidates, so it is never above the model's own bound; the
    # model's own dequantized bound, refined within its cell, is below the paper's switch
    mine, switched = own.estimates["discrete"], paper.estimates["discrete_paper_clamp"]
    assert mine.stderr_bpd is not None and switched.stderr_bpd is not None
    assert switched.bpd < mine.bpd + 3 * math.hypot(mine.stderr_bpd, switched.stderr_bpd)
    precise = {**FAST, "points": 32, "limit": 120, "adapt": True}
    own_deq = itdcli.nll("digits_test", "digits", estimator="dequantized", **precise)
    paper_deq = itdcli.nll("digits_test", "digits", estimator="dequantized", paper_clamp=True, **precise)
    deq, deq_paper = own_deq.estimates["dequantized"], paper_deq.estimates["dequantized_paper_clamp"]
    assert deq.stderr_bpd is not None and deq_paper.stderr_bpd is not None
    assert deq.bpd < deq_paper.bpd - 3 * math.hypot(deq.stderr_bpd, deq_paper.stderr_bpd)
    assert not paper.worse_than_reference


def test_continuous_on_integer_data_comes_only_on_request_with_its_range_stated() -> None:
    run = itdcli.nll("digits_test", "digits", estimator="continuous", **FAST)
    assert set(run.estimates) == {"continuous", "continuous_pointwise"}
    assert any(n.startswith("continuous: on integer data") and f"{run.proposal.logsnr_max:.2f}" in n for n in run.notes)
