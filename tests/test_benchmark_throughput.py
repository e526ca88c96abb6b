"""Smoke test of benchmarks/throughput.py: its FLOP count matches a closed form, and one tiny UNet row runs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from itdcli.models.iddpm import IDDPMConfig, IDDPMDenoiser, IDDPMUNet

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
TINY = IDDPMConfig(image_size=16, model_channels=32, num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The benchmark script loaded as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark_throughput", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling benchmarks/outdir.py, as when run
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_conv_flops_match_the_closed_form(bench: ModuleType, mode: str) -> None:
    c_in, c_out, k, size, batch = 3, 8, 3, 16, 2
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    x = torch.randn(batch, c_in, size, size)
    with bench.mode_context(mode, torch.device("cpu")):
        flops = bench.count_flops(conv, x)
    assert flops / batch == 2 * c_in * c_out * k**2 * size * size


def test_tiny_unet_rows_run_and_count_the_same_flops_in_fp32_and_bf16(bench: ModuleType) -> None:
    torch.manual_seed(0)
    denoiser = IDDPMDenoiser(IDDPMUNet(TINY))
    rows = {mode: bench.measure(denoiser, mode, 2, 1, torch.device("cpu")) for mode in ("fp32", "bf16")}
    for mode, row in rows.items():
        assert (row.mode, row.batch, row.compile_s) == (mode, 2, None)
        assert row.rate > 0 and math.isfinite(row.rate)
        assert row.gflop > 0
    assert rows["bf16"].gflop == rows["fp32"].gflop
