"""Where the crossfit mean-curve control pays: Monte Carlo variance with it over without, by run size.

For several (images, points) budgets on the digits model (stratified base proposal, all other controls on),
runs four seeds with the mean curve forced on at any size and forced off, and prints the ratio of the summed
squared standard errors per estimator. `scoring.MIN_CURVE_KNOTS` (the fewest curve intervals itd fits) is
set from this table. Run: python benchmarks/curve_control.py; writes benchmarks/out/curve_control.json.
"""

from __future__ import annotations

import json

from outdir import out_dir

import itdcli
from itdcli.evaluation import scoring

ESTIMATORS = ("continuous", "discrete", "dequantized")
SIZES = [(30, 16), (60, 8), (60, 16), (120, 8), (40, 32), (100, 16), (200, 8)]
SEEDS = (1, 2, 3, 4)


def summed_variance(images: int, points: int) -> list[float]:
    """Σ over seeds of each estimator's squared Monte Carlo standard error."""
    total = [0.0] * len(ESTIMATORS)
    for seed in SEEDS:
        r = itdcli.nll(
            "digits_test", "digits", points=points, limit=images, seed=seed, adapt=False, estimator="immse", save=False
        )
        for i, name in enumerate(ESTIMATORS):
            total[i] += (r.estimates[name].stderr_bpd or 0.0) ** 2
    return total


def main() -> None:
    """Table: budget, curve intervals it allows, variance ratio on/off per estimator."""
    default = scoring.MIN_CURVE_KNOTS
    rows = []
    for images, points in SIZES:
        scoring.MIN_CURVE_KNOTS = 1
        on = summed_variance(images, points)
        scoring.MIN_CURVE_KNOTS = 10**9
        off = summed_variance(images, points)
        intervals = min(scoring.CURVE_KNOTS, images * points // (2 * scoring.CURVE_CELLS))
        rows.append(
            {
                "images": images,
                "points": points,
                "intervals": intervals,
                "ratio": [a / b for a, b in zip(on, off, strict=True)],
            }
        )
    scoring.MIN_CURVE_KNOTS = default
    print(f"{'images x points':>16} {'intervals':>9}  " + " ".join(f"{n[:10]:>10}" for n in ESTIMATORS))
    for r in rows:
        mark = "" if r["intervals"] >= default else "  (itd: off)"
        ratios = " ".join(f"{v:>10.2f}" for v in r["ratio"])
        print(f"{str(r['images']) + ' x ' + str(r['points']):>16} {r['intervals']:>9}  {ratios}{mark}")
    out = out_dir()
    (out / "curve_control.json").write_text(json.dumps({"min_knots": default, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
