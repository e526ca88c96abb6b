"""Where the benchmarks write their JSON and figures: benchmarks/out/, or $ITD_BENCH_OUT (the tests' smoke runs)."""

from __future__ import annotations

import os
from pathlib import Path


def out_dir() -> Path:
    """The output folder, created if need be; $ITD_BENCH_OUT keeps test runs away from measured results."""
    out = Path(os.environ.get("ITD_BENCH_OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out
