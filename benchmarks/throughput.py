"""Image-forwards per second of itd's two CIFAR-10 UNets (DDPM, IDDPM), random weights, in each precision mode.

Each row times `eps_hat = denoiser(z, logsnr)`, the forward itd evaluates (z float32 (B, 3, 32, 32), logsnr float64
(B,)), under torch.inference_mode in one mode, set up with itd's own runtime helpers: fp32 (TF32 off), tf32 (CUDA
only), bf16 autocast, bf16 with channels-last weights and inputs, and bf16 channels-last compiled the way itd's
--compile does it (runtime.prepare_model: CUDA graphs on GPU; compile time is reported apart, not in the rate).
FLOPs per image are counted by torch.utils.flop_counter.FlopCounterMode on one batch; each format's peak is a dense
square matmul timed in the same run, and each row's fraction of that peak is set against the issue's targets, which
are for an H200 (CPU is not the target). CUDA runs the real sizes with large batches; CPU runs the same
architectures at base width 32 instead of 128 with small batches (--full forces the real sizes) and compiles only
with --compile. Prints a table and writes benchmarks/out/throughput.json.
Run: python benchmarks/throughput.py [--device cpu|cuda] [--batch B] [--reps R] [--full] [--compile | --no-compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
from outdir import out_dir
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from itdcli import runtime
from itdcli.models.diffusers_unet import DDPM_CIFAR10_SCHEDULER, DDPM_CIFAR10_UNET, DiffusersDenoiser
from itdcli.models.iddpm import IDDPMConfig, IDDPMDenoiser, IDDPMUNet

FULL_WIDTH, CPU_WIDTH = 128, 32
FULL_PARAMS = {"ddpm": 35_746_307, "iddpm": 52_546_438}
MODES = ("fp32", "tf32", "bf16", "bf16+channels-last", "bf16+compile")
TARGET = {"fp32": 0.50, "tf32": 0.30, "bf16": 0.35}
H200_BF16_TFLOPS = 790.0
H200_BF16_RATE = {"ddpm": 23_000, "iddpm": 16_500}
LOGSNR = (-6.8, 12.8)
DEFAULTS = {
    "cuda": {"batch": 512, "reps": 20, "warmup": 3, "matrix": 8192, "compile": True, "width": FULL_WIDTH},
    "cpu": {"batch": 4, "reps": 2, "warmup": 0, "matrix": 1024, "compile": False, "width": CPU_WIDTH},
}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One timed mode: image-forwards per second, GFLOP per image, and compile seconds for compiled modes."""

    mode: str
    batch: int
    rate: float
    gflop: float
    compile_s: float | None = None


def number_format(mode: str) -> str:
    """The format a mode's convolutions and matmuls run in, and so the peak it is measured against."""
    return mode.split("+")[0]


def ddpm_config(width: int) -> dict[str, Any]:
    """The UNet2DModel config of google/ddpm-cifar10-32 at base width `width` (128 in the released model)."""
    return {**DDPM_CIFAR10_UNET, "block_out_channels": [width, 2 * width, 2 * width, 2 * width]}


def build_ddpm(width: int) -> nn.Module:
    """itd's diffusers adapter around a randomly initialised DDPM CIFAR-10 UNet and the model's DDPMScheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**ddpm_config(width))
    return DiffusersDenoiser(unet, DDPMScheduler(**DDPM_CIFAR10_SCHEDULER).alphas_cumprod)


def build_iddpm(width: int) -> nn.Module:
    """itd's IDDPM denoiser around a randomly initialised improved-diffusion CIFAR-10 UNet at base width `width`."""
    return IDDPMDenoiser(IDDPMUNet(dataclasses.replace(IDDPMConfig.cifar10(), model_channels=width)))


BUILDERS: dict[str, Callable[[int], nn.Module]] = {"ddpm": build_ddpm, "iddpm": build_iddpm}


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so the clock reads finished work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[..., Any], args: tuple[Any, ...], reps: int, device: torch.device) -> float:
    """Wall seconds for `reps` calls of fn(*args), synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    sync(device)
    return time.perf_counter() - start


def count_flops(fn: Callable[..., Any], *args: Any) -> int:
    """FLOPs of one call as FlopCounterMode counts them (convolutions, matmuls, attention; 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def inputs(shape: tuple[int, ...], batch: int, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    """A float32 image batch z and one float64 logSNR per image, drawn across itd's default logSNR range."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *shape, generator=gen).to(device)
    logsnr = LOGSNR[0] + (LOGSNR[1] - LOGSNR[0]) * torch.rand(batch, generator=gen, dtype=torch.float64)
    return (runtime.to_channels_last(z) if channels_last else z), logsnr.to(device)


@contextmanager
def mode_context(mode: str, device: torch.device) -> Iterator[None]:
    """inference_mode plus itd's network format: bf16 autocast, TF32 on, or exact float32 (TF32 off)."""
    with torch.inference_mode(), runtime.network_mode(cast(runtime.Mode, number_format(mode)), device):
        yield


def measure(
    denoiser: nn.Module, mode: str, batch: int, reps: int, device: torch.device, warmup: int = 0
) -> Measurement:
    """Image-forwards/s and GFLOP/image of denoiser(z, logsnr) in one mode; the FLOP count doubles as a warm-up."""
    channels_last, compiled = mode in ("bf16+channels-last", "bf16+compile"), mode == "bf16+compile"
    denoiser.to(device=device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    z, logsnr = inputs(cast(tuple[int, ...], denoiser.input_shape), batch, device, channels_last)
    with mode_context(mode, device):
        flops = count_flops(denoiser, z, logsnr)
        fn = runtime.prepare_model(denoiser, device, channels_last=channels_last, compile=compiled)
        compile_s = seconds(fn, (z, logsnr), 1, device) if compiled else None
        seconds(fn, (z, logsnr), warmup, device)
        elapsed = seconds(fn, (z, logsnr), reps, device)
    return Measurement(mode, batch, batch * reps / elapsed, flops / batch / 1e9, compile_s)


def matrix_size(fmt: str, n: int, device: torch.device) -> int:
    """The peak matmul's side: n, halved for bf16 on CPU, where bf16 without native support runs ~100x slower."""
    return n // 2 if fmt == "bf16" and device.type == "cpu" else n


def matmul_tflops(fmt: str, n: int, reps: int, device: torch.device) -> float:
    """TFLOP/s of a dense n×n by n×n matmul: bf16 tensors, or float32 with TF32 on (tf32) or off (fp32)."""
    gen = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    with mode_context(fmt, device):
        seconds(torch.matmul, (a, b), 1, device)
        elapsed = seconds(torch.matmul, (a, b), reps, device)
    return 2 * n**3 * reps / elapsed / 1e12


def peaks(formats: list[str], n: int, reps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Each format's measured matmul peak in TFLOP/s, with the matrix side it was measured at."""
    sides = {fmt: matrix_size(fmt, n, device) for fmt in formats}
    return {fmt: {"tflops": matmul_tflops(fmt, sides[fmt], reps, device), "n": sides[fmt]} for fmt in formats}


def record(arch: str, m: Measurement, peak: dict[str, dict[str, float]]) -> dict[str, Any]:
    """One JSON row: the measurement, achieved TFLOP/s, the mode's peak, fraction of peak and target."""
    fmt = number_format(m.mode)
    tflops = m.rate * m.gflop / 1e3
    fraction = tflops / peak[fmt]["tflops"]
    return {
        "arch": arch,
        **dataclasses.asdict(m),
        "tflops": tflops,
        "peak_format": fmt,
        "peak_tflops": peak[fmt]["tflops"],
        "fraction_of_peak": fraction,
        "target_fraction": TARGET[fmt],
        "met": fraction >= TARGET[fmt],
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (platform's guess elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a fixed-width table."""
    head = ("arch", "mode", "batch", "image-forwards/s", "GFLOP/fwd", "TFLOP/s", "peak", "of peak", "target", "met")
    print("{:<6} {:<19} {:>5} {:>16} {:>9} {:>9} {:>9} {:>7} {:>6} {:>3}".format(*head))
    for r in rows:
        print(
            f"{r['arch']:<6} {r['mode']:<19} {r['batch']:>5} {r['rate']:>16,.1f} {r['gflop']:>9.3f} "
            f"{r['tflops']:>9.4g} {r['peak_tflops']:>9.4g} {r['fraction_of_peak']:>7.1%} "
            f"{r['target_fraction']:>6.0%} {'yes' if r['met'] else 'no':>3}"
        )


def print_notes(rows: list[dict[str, Any]], peak: dict[str, dict[str, float]], device: torch.device) -> None:
    """Peaks, compile times and the issue's H200 reference numbers, below the table."""
    print(
        "peaks (dense n×n matmul, this run): "
        + ", ".join(f"{f} {p['tflops']:.4g} TFLOP/s (n={p['n']:.0f})" for f, p in peak.items())
    )
    for r in rows:
        if r["compile_s"] is not None:
            print(f"compile: {r['arch']} {r['compile_s']:.1f} s (first call, not in the rate)")
    targets = ", ".join(f"{a.upper()} ≥ {v:,}" for a, v in H200_BF16_RATE.items())
    print(
        f"reference (issue, H200): dense bf16 matmul ~{H200_BF16_TFLOPS:.0f} TFLOP/s; targets bf16 ≥ 35% of peak "
        f"({targets} image-forwards/s), TF32 ≥ 30%, fp32 ≥ 50%"
    )
    if device.type != "cuda":
        print("CPU run: reduced sizes unless --full; the targets are for the H200 and are shown for the layout only")


def parse_args() -> argparse.Namespace:
    """Command-line options; unset ones take the device's defaults (DEFAULTS)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--arch", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument("--batch", type=int, help="images per forward (CUDA 512, CPU 4)")
    parser.add_argument("--reps", type=int, help="timed forwards per row (CUDA 20, CPU 2)")
    parser.add_argument("--warmup", type=int, help="untimed forwards after the FLOP-counted one (CUDA 3, CPU 0)")
    parser.add_argument("--matrix", type=int, help="side of the peak matmul (CUDA 8192, CPU 1024; bf16 on CPU half)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's choice)")
    parser.add_argument("--full", action="store_true", help="real model sizes on CPU too (always on CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="bf16+compile rows (CUDA: on)")
    args = parser.parse_args()
    device = runtime.resolve_device(args.device)
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.width = FULL_WIDTH if args.full else args.width
    args.device = device
    return args


def modes(device: torch.device, compiled: bool) -> list[str]:
    """The rows to run per architecture: tf32 only on CUDA, compile only when asked."""
    return [m for m in MODES if (m != "tf32" or device.type == "cuda") and (m != "bf16+compile" or compiled)]


def main() -> None:
    """Measure the peaks, then every (architecture, mode) row; print the table and write the JSON."""
    args = parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    formats = sorted({number_format(m) for m in modes(device, args.compile)}, key=list(TARGET).index)
    peak = peaks(formats, args.matrix, max(args.reps, 3), device)
    rows, params = [], {}
    for arch in args.arch:
        torch.manual_seed(0)
        denoiser = BUILDERS[arch](args.width).to(device)
        params[arch] = sum(p.numel() for p in denoiser.parameters())
        if args.width == FULL_WIDTH and params[arch] != FULL_PARAMS[arch]:
            raise SystemExit(f"{arch}: {params[arch]:,} parameters, expected {FULL_PARAMS[arch]:,} at full size")
        for mode in modes(device, args.compile):
            m = measure(denoiser, mode, args.batch, args.reps, device, args.warmup)
            rows.append(record(arch, m, peak))
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    print(f"{device_name(device)}{threads}, torch {torch.__version__}, base width {args.width}, parameters {params}")
    print_table(rows)
    print_notes(rows, peak, device)
    out = out_dir()
    payload = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "width": args.width,
        "full_size": args.width == FULL_WIDTH,
        "params": params,
        "full_size_params": FULL_PARAMS,
        "batch": args.batch,
        "reps": args.reps,
        "peaks": peak,
        "reference_h200": {"bf16_matmul_tflops": H200_BF16_TFLOPS, "bf16_rate": H200_BF16_RATE, "targets": TARGET},
        "rows": rows,
    }
    (out / "throughput.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
