"""How fast the Monte Carlo error of stratified points falls with the points per image: the rounds' planning rate.

`itd nll` plans each next round from the standard error its points have so far. With i.i.d. points that error
falls as J^(−1/2); stratified points fall faster, because finer strata also remove more of the integrand's
variation along logSNR. Planning with the i.i.d. rate overshoots the target. This script runs the digits
default (discrete and dequantized, adaptive proposal, controls) at fixed points per image J for several seeds,
prints the mean reported SE per J and the fitted exponent α of SE ∝ J^(−α) per estimator;
`rounds.STRATIFIED_RATE` is the smallest of them, rounded down. Writes benchmarks/out/rounds.json.
Run: python benchmarks/rounds.py [--points 16 32 64] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import math

from outdir import out_dir

import itdcli

ESTIMATORS = ("discrete", "dequantized")


def slope(points: list[int], errors: list[float]) -> float:
    """α of the least-squares line log SE = c − α log J."""
    xs, ys = [math.log(j) for j in points], [math.log(e) for e in errors]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    """Table: points per image, mean SE of each estimator over seeds; the fitted exponents."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    table: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for j in args.points:
        ses: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
        for seed in range(args.seeds):
            result = itdcli.nll("digits_test", "digits", points=j, seed=seed, save=False)
            for name in ESTIMATORS:
                se = result.estimates[name].stderr_bpd
                assert se is not None
                ses[name].append(se)
        for name in ESTIMATORS:
            table[name].append(sum(ses[name]) / len(ses[name]))
    rates = {name: slope(args.points, table[name]) for name in ESTIMATORS}
    print(f"digits model on digits_test, stratified points, {args.seeds} seeds; mean reported SE (bpd)")
    print(f"{'points':>7} " + " ".join(f"{n:>12}" for n in ESTIMATORS))
    for i, j in enumerate(args.points):
        print(f"{j:>7} " + " ".join(f"{table[n][i]:>12.5f}" for n in ESTIMATORS))
    print(f"{'α':>7} " + " ".join(f"{rates[n]:>12.3f}" for n in ESTIMATORS) + "   (SE ∝ J^−α; i.i.d. points: 0.5)")
    out = out_dir()
    payload = {"points": args.points, "seeds": args.seeds, "stderr_bpd": table, "rates": rates}
    (out / "rounds.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
