"""Every benchmark script still runs against the current library, at tiny sizes, and prints its table.

The figures are not checked here (benchmarks/README.md records measured ones); what is checked is that a
change to itdcli's API has not broken a script that `nox -s bench` would run on a GPU, where device time is
scarce. Output goes to $ITD_BENCH_OUT in a temporary folder, never over measured results in benchmarks/out.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# script, tiny arguments, a header its table prints, the JSON it writes (None: prints JSON on stderr instead)
RUNS = [
    ("batch.py", ["--sizes", "8", "--total", "64", "--rounds", "1"], "batch", "batch.json"),
    ("nll.py", ["--points", "4", "--limit", "8", "--repeats", "1"], "points/s", "nll.json"),
    ("precision.py", ["--images", "8"], "logSNR", "precision.json"),
    (
        "efficiency.py",
        ["--limit", "16", "--points", "8", "--seeds", "1", "--target", "0.1"],
        "paper-clamp",
        "efficiency_target.json",
    ),
    ("vlb.py", ["--limit", "4"], "vlb full loop", "vlb.json"),
    ("throughput.py", ["--reps", "1", "--warmup", "0", "--batch", "2", "--matrix", "64"], "fp32", "throughput.json"),
    ("noise_floor.py", ["--grid", "4", "--draws", "2"], "J for 0.005", "noise_floor.json"),
    ("rounds.py", ["--points", "8", "16", "--seeds", "1"], "dequantized", "rounds.json"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("script", "args", "header", "written"), RUNS, ids=[r[0] for r in RUNS])
def test_benchmark_runs_and_prints_its_table(
    script: str, args: list[str], header: str, written: str, tmp_path: Path
) -> None:
    env = {**os.environ, "ITD_BENCH_OUT": str(tmp_path / "out"), "ITD_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert header in proc.stdout, proc.stdout[-2000:]
    assert json.loads((tmp_path / "out" / written).read_text())  # valid, non-empty JSON where the README says
