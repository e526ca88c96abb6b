"""End-to-end `itd nll` points per second against a naive baseline, side by side in one process.

The baseline is the reference implementation's evaluation loop written plainly: float32, one logSNR at a time
over the whole dataset (a shared grid), and one network forward per estimator kind (clamped, rounded,
dequantized). Prints a table and writes benchmarks/out/nll.json. Run: python benchmarks/nll.py [--points J]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from outdir import out_dir

import itdcli
from itdcli import runtime
from itdcli.core import channel


def naive_points_per_second(model: torch.nn.Module, x: torch.Tensor, levels: int, points: int) -> float:
    """The baseline's (image, logSNR) cells per second: three forwards per cell, one logSNR per pass."""
    delta = 2.0 / (levels - 1)
    grid = torch.linspace(-6.8, 12.8, points, dtype=torch.float64, device=x.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for gamma in grid:
            g = gamma.expand(x.shape[0])
            for kind in ("clamp", "round", "deq"):
                xi = x + delta * (torch.rand_like(x) - 0.5) if kind == "deq" else x
                eps = torch.randn_like(x)
                z = channel.noisy(xi.double(), eps.double(), g).float()
                x_hat = channel.x_hat(z.double(), model(z, g).double(), g)
                if kind == "round":
                    x_hat = -1 + delta * torch.round((x_hat + 1) / delta)
                err = torch.exp(g) * ((xi - x_hat.clamp(-1, 1)) ** 2).flatten(1).sum(1)
                del err
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return x.shape[0] * points / (time.perf_counter() - start)


def main() -> None:
    """Table: method, points/s, network forwards per point, ratio to the baseline."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best rate of each is kept")
    parser.add_argument("--compile", action="store_true", help="also time itd nll --compile (slow to compile on CPU)")
    args = parser.parse_args()
    data = itdcli.load_data("digits_test")
    device = runtime.resolve_device("auto")  # the same device as itd nll's default
    model = itdcli.load_model("digits").to(device)
    x = data.values(torch.arange(args.limit)).to(device)
    common = {"points": args.points, "limit": args.limit, "save": False, "adapt": False, "estimator": "immse"}
    variants = {"itd nll (all estimators)": {}, "itd nll, channels-last": {"channels_last": True}}
    if args.compile:
        itdcli.nll("digits_test", "digits", compile=True, **common)  # compile (its one batch shape) outside the clock
        variants["itd nll --compile (compiling included)"] = {"compile": True}
    # every method once per repeat, interleaved, best rate kept: load from other tenants hits all alike
    best = dict.fromkeys(["naive", *variants], 0.0)
    for _ in range(args.repeats):
        best["naive"] = max(best["naive"], naive_points_per_second(model, x, 17, args.points))
        for name, extra in variants.items():
            result = itdcli.nll("digits_test", "digits", **common, **extra)
            best[name] = max(best[name], args.limit * args.points / result.seconds)
    naive = best["naive"]
    rows = [("naive (fp32, one logSNR at a time, 3 forwards)", naive, 3.0)]
    rows += [(name, best[name], 2.0) for name in variants]
    ours = rows[1][1]
    print(f"{'method':<50} {'points/s':>10} {'forwards/point':>15} {'ratio':>7}")
    for name, rate, forwards in rows:
        print(f"{name:<50} {rate:>10.0f} {forwards:>15.0f} {rate / naive:>7.2f}")
    out = out_dir()
    payload = {"device": result.device, "points": args.points, "images": args.limit, "naive": naive, "itd": ours}
    (out / "nll.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
