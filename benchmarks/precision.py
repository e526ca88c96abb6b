"""Measures where bf16 and TF32 network evaluation departs from float32, per logSNR (spec §11.1).

On a CPU bf16 is real (autocast) and TF32 is emulated (runtime.round_tf32 on every matmul operand).

For each logSNR on a grid, the same images and noise go through the network in float32 and in each lower
format; the table shows the mean absolute change of the per-cell error in bpd per unit logSNR (the change of
the integrand) for the clamped (continuous) and rounded (discrete) errors, and its running integral from
the low end. A format is safe up to the highest logSNR whose running integral stays within half the 0.002 bpd
budget; runtime.BF16_MAX_LOGSNR and TF32_MAX_LOGSNR are set from this table.
Run: python benchmarks/precision.py [--device cuda] [--images 64]; writes benchmarks/out/precision.json.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from outdir import out_dir

import itdcli
from itdcli import runtime
from itdcli.core import channel

BUDGET_BPD = 0.001


def errors(
    model: torch.nn.Module, x: torch.Tensor, k: torch.Tensor, g: float, mode: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped and rounded ε-errors of every image at one logSNR in one format, with a fixed noise seed."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    logsnr = torch.full((x.shape[0],), g, dtype=torch.float64, device=device)
    z = channel.noisy(x, eps, logsnr).float()
    with torch.inference_mode(), runtime.network_mode(mode, device):  # type: ignore[arg-type]
        resid = eps - model(z, logsnr).double()
    return channel.mse_clamped(resid, x, logsnr), channel.mse_rounded_hard(resid, k, logsnr, 17)


def main() -> None:
    """Table: logSNR, per-format integrand change (bpd per unit logSNR) and its running integral."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    device = runtime.resolve_device(args.device)
    data = itdcli.load_data("digits_test")
    model = itdcli.load_model("digits").to(device)
    rows = torch.arange(args.images)
    x = data.values(rows).to(device, torch.float64)
    k = data.x[rows].to(device)
    modes = ["bf16", "tf32"]  # on CPU: real bf16 arithmetic, TF32 emulated by rounding matmul operands
    grid = [float(g) for g in range(-6, 17)]
    scale = 1 / (2 * data.dim * math.log(2))  # ½ · nats → bits per dim
    running = {f"{m}/{e}": 0.0 for m in modes for e in ("clamped", "rounded")}
    table, safe = [], {m: grid[0] for m in modes}
    print(f"{'logSNR':>7} " + " ".join(f"{name:>16} {'∫ so far':>9}" for name in running))
    for g in grid:
        ref = errors(model, x, k, g, "fp32", device)
        row: dict[str, float] = {"logsnr": g}
        for m in modes:
            low = errors(model, x, k, g, m, device)
            for name, a, b in (("clamped", ref[0], low[0]), ("rounded", ref[1], low[1])):
                change = float((a - b).abs().mean()) * scale
                running[f"{m}/{name}"] += change  # grid step 1: the running integral
                row[f"{m}/{name}"] = change
            if max(running[f"{m}/clamped"], running[f"{m}/rounded"]) <= BUDGET_BPD:
                safe[m] = g
        table.append(row)
        print(f"{g:>7.1f} " + " ".join(f"{row[n]:>16.2e} {running[n]:>9.2e}" for n in running))
    limits = ", ".join(f"{m} {v:g}" for m, v in safe.items())
    print(f"safe up to (running change ≤ {BUDGET_BPD:g} bpd): {limits}")
    out = out_dir()
    payload = {
        "device": str(device),
        "images": args.images,
        "budget_bpd": BUDGET_BPD,
        "safe_up_to": safe,
        "rows": table,
    }
    (out / "precision.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
