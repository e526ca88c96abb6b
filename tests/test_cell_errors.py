"""The typed per-cell errors between engine, scoring, ensemble, curve and finetune, and their saved form.

Ground truth: the saved file read back with safetensors alone (the documented mse/NAME columns), and the
noise moments' exact mean of zero under ε ~ N(0, I) (controls are only controls if it holds).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import itdcli
from itdcli.core import controls
from itdcli.core.proposal import Proposal
from itdcli.evaluation import engine, units
from itdcli.evaluation.cellerrors import Candidate, CellErrors, Projections, merged

IMAGES = 24
POINTS = 8


@pytest.fixture(scope="module")
def curves() -> engine.Curves:
    """The digits model's curves for every estimator unit on a few test images (one engine pass per kind)."""
    from itdcli.api.nll import resolve_reference

    data = itdcli.load_data("digits_test")
    ref = resolve_reference(None, data).ref
    kinds = units.kinds(["continuous", "discrete", "dequantized"])
    plan = engine.Plan(Proposal("logistic", 0.0, 2.0, -6.0, 12.0), POINTS, "stratified", 0, 256, kinds=kinds)
    return engine.evaluate(itdcli.load_model("digits"), data, ref, plan, torch.device("cpu"), torch.arange(IMAGES))


def test_every_field_the_units_need_is_recorded_with_its_shape(curves: engine.Curves) -> None:
    e = curves.errors
    own = e.members[""]
    for t in (own.model, own.round, own.deq, own.deq_cell, e.gauss, e.gauss_deq, e.cv, e.cv_deq):
        assert t is not None and t.shape == (IMAGES, POINTS) and t.dtype == torch.float64
    assert e.moments is not None and e.moments.shape == (IMAGES, POINTS, len(controls.NAMES))
    assert e.deq_moments is not None and e.deq_moments.shape == (IMAGES, POINTS, len(controls.DEQ_NAMES))
    for unit in units.UNITS.values():
        assert all(e.error(Candidate(k)) is not None for k in (*unit.candidates, unit.reference))
        cv = e.controls(unit.controls)
        assert cv is not None and cv.shape[1:] == (IMAGES, POINTS)


def test_controls_come_in_the_declared_order_and_have_mean_zero(curves: engine.Curves) -> None:
    """cv first, then each moment column in its NAMES order; every control averages to 0 within 4 SE."""
    e = curves.errors
    main = e.controls(units.MAIN_CONTROLS)
    deq = e.controls(units.DEQ_CONTROLS)
    assert main is not None and deq is not None
    assert main.shape[0] == 1 + len(controls.NAMES) and deq.shape[0] == 1 + len(controls.DEQ_NAMES + controls.NAMES)
    assert torch.equal(main[0], e.cv) and torch.equal(deq[0], e.cv_deq)  # type: ignore[arg-type]
    assert e.moments is not None and e.deq_moments is not None
    for i in range(len(controls.NAMES)):
        assert torch.equal(main[1 + i], e.moments[..., i])
        assert torch.equal(deq[1 + len(controls.DEQ_NAMES) + i], e.moments[..., i])
    for i in range(len(controls.DEQ_NAMES)):
        assert torch.equal(deq[1 + i], e.deq_moments[..., i])
    for c in torch.cat([main, deq]):
        flat = c.reshape(-1)
        if float(flat.std()) > 0:  # a pixel class with no pixels (no bound pixels at all) is zero throughout
            assert abs(float(flat.mean())) < 4 * float(flat.std()) / flat.numel() ** 0.5


def test_saved_form_is_the_documented_columns_and_reads_back_unchanged(curves: engine.Curves, tmp_path: Path) -> None:
    """mse/NAME per field and per moment column (docs/commands.md), read back by safetensors alone."""
    from safetensors.torch import save_file

    path = tmp_path / "arrays.safetensors"
    save_file(curves.to_arrays(), str(path))
    saved = load_file(str(path))
    names = {
        "model",
        "round",
        "deq",
        "deq_cell",
        "gauss",
        "gauss_deq",
        "cv",
        "cv_deq",
        *controls.NAMES,
        *controls.DEQ_NAMES,
    }
    assert {k for k in saved if k.startswith("mse/")} == {f"mse/{n}" for n in names}
    e = curves.errors
    assert e.moments is not None and e.members[""].round is not None
    assert torch.equal(saved["mse/round"], e.members[""].round.float())
    assert torch.equal(saved[f"mse/{controls.NAMES[5]}"], e.moments[..., 5].float())
    back = engine.Curves.from_arrays({"index": curves.index, **saved})
    assert back.to_arrays().keys() == saved.keys()
    assert all(torch.equal(back.to_arrays()[k], saved[k]) for k in saved)


def test_a_saved_run_reads_back_into_its_fields(itd_home: Path) -> None:
    """`itd nll --out`'s arrays.safetensors: the run's own errors, under the fields the engine recorded."""
    out = itd_home / "run"
    itdcli.nll("digits_test", "digits", limit=12, points=8, adapt=False, out=out)
    saved = load_file(str(out / "arrays.safetensors"))
    back = CellErrors.from_arrays(saved)
    assert back.members[""].round is not None and torch.equal(back.members[""].round, saved["mse/round"].double())
    assert back.deq_moments is not None and back.deq_moments.shape == (12, 8, len(controls.DEQ_NAMES))
    assert set(back.recorded()) >= {"model", "round", "deq", "deq_cell", "gauss", "cv", "moments", "deq_moments"}


def test_joining_rounds_and_images_inverts_splitting(curves: engine.Curves) -> None:
    e = curves.errors
    halves = [e.map(lambda t: t[:, :3]), e.map(lambda t: t[:, 3:])]
    rows = [e.map(lambda t: t[:10]), e.map(lambda t: t[10:])]
    for joined in (CellErrors.cat(halves, 1), CellErrors.cat(rows, 0)):
        assert all(torch.equal(a, b) for a, b in zip(_tensors(joined), _tensors(e), strict=True))
    with pytest.raises(ValueError, match="same fields"):
        CellErrors.cat([e, e.only(lambda k: k != "cv")], 0)


def test_only_keeps_the_named_fields(curves: engine.Curves) -> None:
    main = curves.subset(units.PASS_ERRORS["main"].__contains__).errors
    assert set(main.recorded()) == {"gauss", "model", "round", "cv", "moments"}
    deq = curves.subset(units.PASS_ERRORS["deq"].__contains__).errors
    assert set(deq.recorded()) == {"deq", "deq_cell", "gauss_deq", "cv_deq", "deq_moments", "moments"}


def test_an_ensemble_holds_each_members_projections_and_one_set_of_shared_fields(curves: engine.Curves) -> None:
    e = curves.errors
    other = e.map(lambda t: t + 1.0)
    both = merged({"a": e, "b": other})
    assert torch.equal(both.error(Candidate("round", "b")), other.members[""].round)  # type: ignore[arg-type]
    assert torch.equal(both.error(Candidate("round", "a")), e.members[""].round)  # type: ignore[arg-type]
    assert both.error(Candidate("round")) is None  # no unlabelled model in an ensemble
    stacked = both.stack([Candidate("round", "b"), Candidate("gauss")])
    assert torch.equal(stacked[0], other.members[""].round) and torch.equal(stacked[1], e.gauss)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every field asked for"):
        both.stack([Candidate("round"), Candidate("gauss")])  # never silently one short of the choice's indices
    assert both.gauss is e.gauss  # shared: the first run's
    keys = [c.key for c, _ in both.candidates()]
    mine = ["model", "round", "deq", "deq_cell"]
    assert keys == [f"a/{k}" for k in mine] + [f"b/{k}" for k in mine] + ["gauss", "gauss_deq"]
    with pytest.raises(ValueError, match="one-model"):
        both.to_arrays()


def _tensors(e: CellErrors) -> list[torch.Tensor]:
    """Every recorded tensor, in a fixed order."""
    own: Projections = e.members[""]
    found = [
        own.model,
        own.round,
        own.deq,
        own.deq_cell,
        e.gauss,
        e.gauss_deq,
        e.cv,
        e.cv_deq,
        e.moments,
        e.deq_moments,
    ]
    return [t for t in found if t is not None]
