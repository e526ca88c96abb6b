"""The fewest points per image that any logSNR density can need, given the noise left after itd's controls.

Stratified points and the mean-curve control remove an integrand's variation along logSNR; what no choice of
points removes is the noise of one cell: how the error of the same image at the same logSNR changes with the
noise draw. With S(γ)² that variance (averaged over images), the best density p ∝ S and infinitely fine
strata give a dataset standard error of ∫ S dγ / √(N·J) with J points per image (Neyman allocation, Cochran
1977, §5.5), so J ≥ (∫ S dγ)² / (N·SE²). This script measures S on a grid of logSNR with several noise draws
per image, from itd's own engine (a proposal of zero width at each grid value), for the candidate each
estimator would choose there among the model's own projections (lowest mean error; the Gaussian's error
only as a control), after that estimator's control variates (fitted per grid point, crossfit over two folds
of images). It also computes the paper's standard error at 1,000 i.i.d. points from the same grid (logistic
proposal, chosen candidate, no controls), and prints the floor on points for the 0.005 bpd target and for
the paper's error, with the share of the paper's 3,000 evaluations per image that the floor implies (one
forward per point on x, shared by continuous and discrete; one on dequantized x).
Run: python benchmarks/noise_floor.py [--grid 48] [--draws 4]; writes benchmarks/out/noise_floor.json.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from outdir import out_dir

import itdcli
from itdcli.api.nll import make_proposal, resolve_reference
from itdcli.api.options import NllOptions
from itdcli.core import estimators as est
from itdcli.core.proposal import Proposal
from itdcli.evaluation import engine, units
from itdcli.evaluation.cellerrors import CellErrors
from itdcli.models.base import Denoiser

F64 = torch.float64
TARGET_BPD = 0.005
PAPER_POINTS, PAPER_FORWARDS = 1000, 3


ESTIMATORS = ("continuous", "discrete", "dequantized")


def cell_errors(
    model: Denoiser, data: itdcli.Dataset, ref: itdcli.GaussianReference, gamma: float, draws: int, seed: int
) -> CellErrors:
    """Every candidate error and control variate of itd's engine, (N, D) each, at one logSNR.

    The engine is run with a proposal of zero width at γ, so its D points per image are D independent noise
    draws (and dequantization offsets) at the same logSNR.
    """
    plan = engine.Plan(
        Proposal("uniform", 0.0, 1.0, gamma, gamma + 1e-9),
        draws,
        "iid",
        seed,
        engine.default_batch_size(data.dim),
        kinds=units.kinds(list(ESTIMATORS)),
    )
    return engine.evaluate(model, data, ref, plan, torch.device("cpu")).errors


def integrand(unit: units.Unit, error: torch.Tensor, gamma: float, mmse_g: float) -> torch.Tensor:
    """The unit's own integrand (nats per unit logSNR) of the cells' chosen error, signed as it enters the value."""
    cells = units.Cells(torch.full_like(error, gamma), None, torch.full_like(error, mmse_g))
    return unit.sign * unit.form(error, cells)


def main() -> None:
    """Table per estimator: ∫S dγ, floor on points for the target and for the paper's error, paper's SE."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", type=int, default=48, help="logSNR values, evenly spaced over the range")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per image and logSNR")
    args = parser.parse_args()
    data = itdcli.load_data("digits_test")
    resolved = resolve_reference(None, data)
    ref = resolved.ref
    proposal = make_proposal(NllOptions.model_validate({}), resolved.spectrum, ref, list(ESTIMATORS), data.levels)
    model = itdcli.load_model("digits", reference=ref)
    edges = torch.linspace(proposal.logsnr_min, proposal.logsnr_max, args.grid + 1, dtype=F64)
    mid, width = (edges[1:] + edges[:-1]) / 2, float(edges[1] - edges[0])
    n, dim = len(data), data.dim
    bpd = 1 / (dim * math.log(2))
    folds = est.crossfit_folds(n, 2, torch.Generator().manual_seed(1))
    noise = {kind: torch.zeros(args.grid, dtype=F64) for kind in ESTIMATORS}
    second = {kind: torch.zeros(args.grid, n, dtype=F64) for kind in ESTIMATORS}  # E_ε f² per image, for the paper
    mean = {kind: torch.zeros(args.grid, n, dtype=F64) for kind in ESTIMATORS}
    for i, gamma in enumerate(mid.tolist()):
        cells = cell_errors(model, data, ref, gamma, args.draws, seed=i)
        mg = float(ref.mmse(torch.tensor(gamma, dtype=F64)))
        for kind in ESTIMATORS:
            unit = units.UNITS[kind]
            own = [e for k in unit.candidates if (e := cells.members[""].get(k)) is not None]
            best = min(own, key=lambda e: float(e.mean()))  # the model's own projections only
            raw = integrand(unit, best, gamma, mg) * bpd
            mean[kind][i], second[kind][i] = raw.mean(1), (raw**2).mean(1)
            cvs = cells.controls(unit.controls)
            assert cvs is not None, "the engine recorded no control variates"
            bins = torch.zeros_like(best, dtype=torch.long)
            fitted = est.control_variate(best, cvs, torch.ones_like(best), bins, folds)
            noise[kind][i] = (integrand(unit, fitted, gamma, mg) * bpd).var(1).mean().sqrt()
    density = proposal.density(mid)
    rows = {}
    for kind in ESTIMATORS:
        floor = float(noise[kind].sum() * width)  # ∫ S dγ
        integral_n = (mean[kind] * width).sum(0)
        var_iid = float(((second[kind] / density[:, None]) * width).sum(0).mean() - (integral_n**2).mean())
        paper_se = math.sqrt(var_iid / (n * PAPER_POINTS))
        rows[kind] = {
            "floor_integral_bpd": floor,
            "paper_se_1000": paper_se,
            "points_target": floor**2 / (n * TARGET_BPD**2),
            "points_paper": floor**2 / (n * paper_se**2),
        }
    main_target = max(rows["continuous"]["points_target"], rows["discrete"]["points_target"])
    main_paper = max(rows["continuous"]["points_paper"], rows["discrete"]["points_paper"])
    share = (main_paper + rows["dequantized"]["points_paper"]) / (PAPER_POINTS * PAPER_FORWARDS)
    print(f"digits model, {n} images, {args.grid} logSNR values x {args.draws} noise draws, controls crossfit")
    print(f"{'estimator':<12} {'∫S dγ':>8} {'paper SE':>9} {'J for 0.005':>12} {'J for paper SE':>15}")
    for kind, r in rows.items():
        print(
            f"{kind:<12} {r['floor_integral_bpd']:>8.4f} {r['paper_se_1000']:>9.4f} "
            f"{r['points_target']:>12.1f} {r['points_paper']:>15.1f}"
        )
    print(
        f"floor on evaluations per image: {main_target + rows['dequantized']['points_target']:.1f} for ±{TARGET_BPD}, "
        f"{main_paper + rows['dequantized']['points_paper']:.1f} for the paper's errors ({share:.2%} of its 3,000)"
    )
    out = out_dir()
    payload = {"grid": args.grid, "draws": args.draws, "images": n, "rows": rows, "share_for_paper_se": share}
    (out / "noise_floor.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
