"""Image-forwards per second of the bundled digits network by batch size, the basis of the CPU default batch.

Every batch size is timed in turn, the whole sweep repeated `--rounds` times, and the best of each kept, so
that other load on a shared machine affects all sizes alike. Prints a table and writes benchmarks/out/batch.json.
Run: python benchmarks/batch.py [--sizes 64 256 512 1024 4096]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from outdir import out_dir

import itdcli
from itdcli import runtime
from itdcli.evaluation import engine


def forwards_per_second(model: torch.nn.Module, batch: int, total: int, device: torch.device) -> float:
    """Image-forwards per second over `total` images in batches of `batch` (after one warm-up batch)."""
    z = torch.randn(batch, 1, 8, 8, device=device)
    g = torch.linspace(-6.8, 12.8, batch, dtype=torch.float64, device=device)
    model(z, g)
    start = time.perf_counter()
    for _ in range(max(1, total // batch)):
        model(z, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return max(1, total // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    """Table: batch size, best image-forwards/s, ratio to the largest size; marks itd's default."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--total", type=int, default=8192, help="images per timing")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = runtime.resolve_device("auto")
    model = itdcli.load_model("digits").to(device)
    best = dict.fromkeys(args.sizes, 0.0)
    with torch.inference_mode():
        for _ in range(args.rounds):
            for b in args.sizes:
                best[b] = max(best[b], forwards_per_second(model, b, args.total, device))
    default = engine.default_batch_size(64, device)
    largest = best[max(args.sizes)]
    print(f"digits network on {device}, {torch.get_num_threads()} threads, best of {args.rounds}")
    print(f"{'batch':>6}  {'image-forwards/s':>16}  {'ratio to ' + str(max(args.sizes)):>13}")
    for b in args.sizes:
        mark = "  <- itd default" if b == default else ""
        print(f"{b:>6}  {best[b]:>16.0f}  {best[b] / largest:>13.2f}{mark}")
    out = out_dir()
    rows = [{"batch": b, "forwards_per_second": best[b]} for b in args.sizes]
    (out / "batch.json").write_text(json.dumps({"device": str(device), "default": default, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
