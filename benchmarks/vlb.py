"""The variational bound: the full loop over every step against the stratified estimate at a few percent of its cost.

Runs `itd nll --estimator vlb` on the bundled `digits` model (CPU) twice on the same images: `--vlb-full`
(every step of the default T = 1000 schedule once, improved-diffusion's calc_bpd_loop, 1,002 evaluations per
image with the decoder's two draws and a second draw of the unpaired last step) and the default stratified
estimate with a target loose enough that its first round of 32 steps per image stops it (pilot and decoder
included, under 5% of the full loop's evaluations on 100 images or more). Prints bpd ± Monte Carlo SE,
evaluations per image, seconds and the difference in units of the combined SE, with the default ITD estimates
(discrete, dequantized) on the same images as a reference row; writes benchmarks/out/vlb.json.
Run: python benchmarks/vlb.py [--limit 100] [--seed 0] [--no-itd]
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from outdir import out_dir

import itdcli

# bits/dim: above the first round's SE (≈0.02–0.04 on the digits), so one round of 32 steps stops the bound;
# not much larger, since the target also sets the logSNR range and above ≈5 bpd that range comes out empty
ONE_ROUND = 1.0
BUDGET = 0.05  # the stratified estimate's share of the full loop's evaluations


def row(label: str, result: Any, name: str, evals: float) -> dict[str, Any]:
    """One table row: an estimator's bpd, Monte Carlo SE, evaluations per image and seconds."""
    e = result.estimates[name]
    solver = result.solvers.get(name)
    return {
        "method": label,
        "estimator": name,
        "bpd": e.bpd,
        "stderr_bpd": e.stderr_bpd,
        "evals_per_image": evals,
        "seconds": solver.seconds if solver is not None else result.seconds,
        "details": dict(solver.details) if solver is not None else {},
    }


def main() -> None:
    """Full loop, stratified bound and (optionally) the default ITD estimates on the same images."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits")
    parser.add_argument("--data", default="digits_test")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-itd", action="store_true", help="skip the default ITD estimates' reference row")
    args = parser.parse_args()
    common = {"limit": args.limit, "seed": args.seed, "save": False}
    full = itdcli.nll(args.data, args.model, estimator="vlb", vlb_full=True, **common)
    strat = itdcli.nll(args.data, args.model, estimator="vlb", target_stderr=ONE_ROUND, **common)
    rows = [
        row("vlb full loop", full, "vlb", full.solvers["vlb"].evals_per_image),
        row("vlb stratified", strat, "vlb", strat.solvers["vlb"].evals_per_image),
    ]
    if not args.no_itd:
        itd = itdcli.nll(args.data, args.model, **common)
        rows += [row(f"itd default ({n})", itd, n, itd.evals_per_image) for n in itd.estimates]
    base = rows[0]
    for r in rows:
        r["share_of_full_evals"] = r["evals_per_image"] / base["evals_per_image"]
        combined = math.hypot(base["stderr_bpd"] or 0.0, r["stderr_bpd"] or 0.0)
        same = r is not base and r["estimator"] == "vlb"  # the ITD rows bound other quantities
        r["diff_vs_full_in_se"] = (r["bpd"] - base["bpd"]) / combined if same else None
    print(f"{args.model} on {args.data}, {full.data.n_images} images, {full.solvers['vlb'].details['schedule']}")
    print(f"{'method':<28} {'bpd':>8} {'± SE':>8} {'evals/img':>10} {'share':>7} {'seconds':>8} {'Δ/SE':>7}")
    for r in rows:
        diff = "" if r["diff_vs_full_in_se"] is None else f"{r['diff_vs_full_in_se']:+.2f}"
        print(
            f"{r['method']:<28} {r['bpd']:>8.4f} {r['stderr_bpd'] or float('nan'):>8.4f} {r['evals_per_image']:>10.1f} "
            f"{r['share_of_full_evals']:>7.2%} {r['seconds']:>8.1f} {diff:>7}"
        )
    share = rows[1]["share_of_full_evals"]
    if share > BUDGET:
        print(f"note: the stratified bound used {share:.1%} of the full loop's evaluations (budget {BUDGET:.0%})")
    print("Δ/SE: (bpd − full loop) / √(SE² + SE_full²), for the bound's rows only")
    out = out_dir()
    record = {"model": args.model, "data": args.data, "n_images": full.data.n_images, "seed": args.seed, "rows": rows}
    (out / "vlb.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
