"""Monte Carlo standard error of the dataset bpd against network evaluations per image, per technique.

Runs `itd nll` on the bundled `digits` model (CPU) with fixed budgets for: the paper's scheme (i.i.d. logistic
points), stratified points, an antithetic noise pair per point, the control variates, the adaptive
pilot proposal, and itd's default (stratified + adaptive + control variates). From each run's standard error
it derives the share of the paper's 1,000-point evaluations (3 forwards per point) that reaches the paper's
standard error: share = (SE² · evals per image) / (SE_paper,1000² · 3,000), with SE_paper,1000 extrapolated
from the i.i.d. run as SE_iid · √(J/1000). Prints a table, writes benchmarks/out/efficiency.json and
efficiency.png. With --seeds K it then runs to the target (--target, default ±0.005 bits/dim) for seeds
0..K−1 and prints the network evaluations per image each of three runs takes: the default (the model's own
bound), the same with --paper-clamp (the paper's clamp, an ensemble with N(μ, Σ)) and --discrete alone; written
to efficiency_target.json.
Run: python benchmarks/efficiency.py [--limit N] [--points 8 32] [--model digits] [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from outdir import out_dir

import itdcli

BASE = {"adapt": False, "control_variate": False, "scheme": "stratified"}
TECHNIQUES: dict[str, dict[str, Any]] = {
    "paper (iid)": {**BASE, "scheme": "iid"},
    "stratified": BASE,
    "antithetic pair": {**BASE, "antithetic": True},
    "control variates": {**BASE, "control_variate": True},
    "adaptive proposal": {**BASE, "adapt": True},
    "itd default": {"adapt": True, "control_variate": True},
}
ESTIMATORS = ("continuous", "discrete", "dequantized")
PAPER_POINTS, PAPER_FORWARDS = 1000, 3
TO_TARGET: dict[str, dict[str, Any]] = {
    "default (own bound)": {},
    "--paper-clamp": {"paper_clamp": True},
    "--discrete": {"estimator": "discrete"},
}


def measure(model: str, data: str, points: int, limit: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """One fixed-budget run: evaluations per image and the Monte Carlo standard error of each estimator."""
    r = itdcli.nll(data, model, points=points, limit=limit, save=False, seed=11, estimator="immse", **options)
    return {
        "points": points,
        "evals": r.evals_per_image,
        "seconds": r.seconds,
        **{n: r.estimates[n].stderr_bpd for n in ESTIMATORS},
    }


def to_target(model: str, data: str, limit: int | None, seeds: int, target: float) -> list[dict[str, Any]]:
    """Per run kind, the evaluations per image (and the largest reported SE) to reach the target in bits/dim."""
    rows = []
    for name, options in TO_TARGET.items():
        runs = [
            itdcli.nll(data, model, limit=limit, save=False, seed=s, target_stderr=target, **options)
            for s in range(seeds)
        ]
        evals = [r.evals_per_image for r in runs]
        worst = max(e.stderr_bpd for r in runs for e in r.estimates.values())
        rows.append({"run": name, "evals": evals, "mean": sum(evals) / len(evals), "largest_se": worst})
    print(f"\n{f'to ±{target}, seeds 0-{seeds - 1}':<22} {'mean':>6} {'min':>6} {'max':>6} {'largest SE':>11}")
    for r in rows:
        print(
            f"{r['run']:<22} {r['mean']:>6.1f} {min(r['evals']):>6.1f} {max(r['evals']):>6.1f} {r['largest_se']:>11.4f}"
        )
    return rows


def main() -> None:
    """Table: technique, points, evaluations per image, SE per estimator and the share of the paper's evaluations."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits")
    parser.add_argument("--data", default="digits_test")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--points", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seeds", type=int, default=0, help="seeds of the runs to the target (0: none)")
    parser.add_argument("--target", type=float, default=0.005, help="the runs' target standard error, bits/dim")
    args = parser.parse_args()
    rows = [
        {"technique": name, **measure(args.model, args.data, j, args.limit, opts)}
        for name, opts in TECHNIQUES.items()
        for j in args.points
    ]
    paper = {
        n: min(r[n] * (r["points"] / PAPER_POINTS) ** 0.5 for r in rows if r["technique"] == "paper (iid)")
        for n in ESTIMATORS
    }
    head = " ".join(f"{'SE ' + n[:5]:>9} {'share':>7}" for n in ESTIMATORS)
    print(f"{'technique':<18} {'points':>6} {'evals':>7} {head}")
    for r in rows:
        for n in ESTIMATORS:
            r[f"share/{n}"] = r[n] ** 2 * r["evals"] / (paper[n] ** 2 * PAPER_POINTS * PAPER_FORWARDS)
        cells = " ".join(f"{r[n]:>9.4f} {r[f'share/{n}']:>7.2%}" for n in ESTIMATORS)
        print(f"{r['technique']:<18} {r['points']:>6} {r['evals']:>7.1f} {cells}")
    print("paper's 1,000-point SE (extrapolated): " + ", ".join(f"{n} {v:.4f}" for n, v in paper.items()))
    out = out_dir()
    (out / "efficiency.json").write_text(json.dumps({"paper_se_1000": paper, "rows": rows}, indent=2) + "\n")
    _figure(rows, out / "efficiency.png")
    if args.seeds:
        target = to_target(args.model, args.data, args.limit, args.seeds, args.target)
        (out / "efficiency_target.json").write_text(json.dumps(target, indent=2) + "\n")


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    """SE against evaluations per image, one panel per estimator, one line per technique (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ESTIMATORS), figsize=(4 * len(ESTIMATORS), 3.4), constrained_layout=True)
    for ax, n in zip(axes, ESTIMATORS, strict=True):
        for name in TECHNIQUES:
            mine = [r for r in rows if r["technique"] == name]
            ax.loglog([r["evals"] for r in mine], [r[n] for r in mine], marker="o", label=name)
        ax.set_title(n)
        ax.set_xlabel("network evaluations per image")
        ax.set_ylabel("Monte Carlo SE (bits/dim)")
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
