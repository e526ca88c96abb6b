"""Outputs checked before work, bounded work, advice that works when followed, help that reads at 80 columns."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itdcli.cli.main import main

COMMANDS = ("nll", "curve", "download", "finetune", "ensemble")
TINY = "iddpm:channels=32,res_blocks=1,mult=1,attn=none,heads=4,dropout=0.1"


def fails(args: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    """Assert `itd ARGS` exits 2 with one error line holding every word; return the line."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def succeeds(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Assert `itd ARGS` exits 0; return stdout."""
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_a_pseudo_filesystem_is_refused_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's `--out /proc/x` computed for 39 s, then named a temporary path; now nothing runs at all."""
    line = fails(["nll", "digits_test", "--points", "8", "--limit", "10", "--out", "/proc/x"], capsys, "/proc", "proc")
    assert "pseudo-filesystem" in line
    fails(["download", "cifar10", "--dir", "/proc/x"], capsys, "/proc", "pseudo-filesystem")
    fails(["curve", "--out", "/proc/x/fig.pdf"], capsys, "pseudo-filesystem")


def test_the_current_folder_is_refused_and_nothing_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    fails(["nll", "digits_test", "--points", "8", "--limit", "10", "--out", ".", "--overwrite"], capsys, "folder you")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.parent.iterdir() if p.name.startswith(".itd-")) == []


def test_a_run_that_cannot_fit_in_memory_is_refused_with_points_that_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--points 1000000000 --limit 5` was killed by the kernel at 23.5 GB; it is now refused with the numbers."""
    out = tmp_path / "run"
    args = ["nll", "digits_test", "--points", "1000000000", "--limit", "5", "--out", str(out)]
    line = fails(args, capsys, "5 images", "1,000,000,000 points", "GB of memory", "is available")
    assert not out.exists()
    points = int(re.search(r"--points ([\d,]+) or fewer", line).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert 1000 < points < 1_000_000_000

    from itdcli.evaluation import engine, rounds

    # the suggested --points passes the same check (running it would take hours on a CPU)
    def check(points: int) -> None:
        plan = engine.Plan(_proposal(), points, "stratified", 0, 512, kinds=frozenset({"model", "round", "deq"}))
        run = rounds.Run(
            lambda z, g: z,
            _digits(),
            None,
            _cpu(),
            _index(5),
            ["discrete"],
            None,
            None,  # type: ignore[arg-type]
        )
        run.check_first({"main": plan})

    check(points)
    with pytest.raises(Exception, match="GB of memory"):
        check(points * 4)


def _proposal():  # type: ignore[no-untyped-def]
    from itdcli.core.proposal import Proposal

    return Proposal("logistic", 0.0, 2.0, -6.0, 12.0)


def _digits():  # type: ignore[no-untyped-def]
    from itdcli.data import load_data

    return load_data("digits_test")


def _cpu():  # type: ignore[no-untyped-def]
    import torch

    return torch.device("cpu")


def _index(n: int):  # type: ignore[no-untyped-def]
    import torch

    return torch.arange(n)


def test_integer_data_get_level_advice_that_works_when_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """int32 levels scaled by 1000 were told to give --levels 254001, which was then refused."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 17, (40, 1, 4, 4)).astype(np.int32)
    np.savez(tmp_path / "scaled.npz", x=levels * 1000)
    line = fails(["nll", str(tmp_path / "scaled.npz"), "--points", "8"], capsys, "multiples of 1000")
    given = int(re.search(r"--levels (\d+)", line).group(1))  # type: ignore[union-attr]
    np.savez(tmp_path / "divided.npz", x=levels * 1000 // 1000)
    out = succeeds(["nll", str(tmp_path / "divided.npz"), "--levels", str(given), "--points", "8", "--json"], capsys)
    assert json.loads(out)["data"]["levels"] == given
    np.savez(tmp_path / "wide.npz", x=rng.integers(0, 40000, (40, 1, 4, 4)).astype(np.int32) * 3 + 1)
    fails(["nll", str(tmp_path / "wide.npz"), "--points", "8"], capsys, "float32")


def _help(*args: str) -> str:
    """`itd ARGS --help` as a user at an 80-column terminal sees it."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm"}
    proc = subprocess.run(
        [sys.executable, "-m", "itdcli", *args, "--help"], capture_output=True, text=True, env=env, check=True
    )
    return proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_at_80_columns_with_examples_and_no_missing_options(command: str) -> None:
    text = _help(command)
    words = re.sub(r"-\n\s+", "-", text)  # click may break a long flag at its hyphen
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text and "{data}" not in text, text
    assert "Examples:" in text and f"itd {command}" in text.split("Examples:")[1]
    mentioned = set(re.findall(r"(--[a-z][a-z-]+)", words.split("Examples:")[0]))
    offered = set(re.findall(r"^\s+(?:-\w, )?(--[a-z-]+)(?:\s|/|$)", text, re.MULTILINE))
    offered |= {"--no-" + o[2:] for o in offered} | {"--help"}
    assert mentioned <= offered | {"--no-adapt", "--no-control-variate"}, mentioned - offered


def test_the_four_typed_commands_are_the_examples() -> None:
    examples = "".join(_help(c).split("Examples:")[1] for c in COMMANDS)
    for typed in (
        "itd download iddpm",
        "itd finetune --model ddpm",
        "itd nll cifar_test --discrete",
        "itd curve --out fig.pdf",
    ):
        assert typed in examples
    assert "required unless --init scratch" in " ".join(_help("finetune").split())


def test_curve_names_the_run_it_drew_and_overwrites_only_its_own_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    succeeds(["nll", "digits_test", "--points", "8", "--limit", "10", "--out", str(run)], capsys)
    fig = tmp_path / "fig.pdf"
    said = succeeds(["curve", "--out", str(fig)], capsys)
    assert str(run.resolve()) in said and fig.exists()
    succeeds(["curve", "--out", str(fig), "--overwrite"], capsys)
    mine = tmp_path / "mine.pdf"
    mine.write_bytes(b"%PDF-1.4 my paper")
    fails(["curve", "--out", str(mine), "--overwrite"], capsys, "not drawn by itd curve")
    assert mine.read_bytes() == b"%PDF-1.4 my paper"


def test_finetune_as_typed_needs_no_out_and_overwrite_keeps_foreign_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["finetune", "--init", "scratch", "--arch", TINY, "--steps", "2", "--batch-size", "16", "--device", "cpu"]
    said = succeeds([*base, "--json"], capsys)
    out = Path(json.loads(said)["out"])
    assert (out / "checkpoint" / "model.safetensors").exists() and "runs" in out.parts
    fails([*base, "--resume"], capsys, "--resume needs --out")
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine")
    fails([*base, "--out", str(folder), "--overwrite"], capsys, "thesis.tex", "did not write")
    assert (folder / "thesis.tex").read_text() == "mine"


def test_a_tail_above_its_limit_gets_an_end_that_brings_it_under(capsys: pytest.CaptureFixture[str]) -> None:
    """The pointwise tail depends on the scored images; the advised --logsnr-max, followed, silences the warning."""
    args = ["nll", "digits_test", "--model", "gaussian", "--estimator", "continuous", "--limit", "100"]
    args += ["--points", "8", "--json"]
    first = json.loads(succeeds(args, capsys))
    advice = [w for w in first["warnings"] if "right tail" in w]
    assert advice, first["warnings"]
    end = re.search(r"give --logsnr-max ([\d.]+)", advice[0]).group(1)  # type: ignore[union-attr]
    second = json.loads(succeeds([*args, "--logsnr-max", end], capsys))
    assert not [w for w in second["warnings"] if "tail" in w], second["warnings"]
    assert all(t["right_bpd"] <= t["limit_bpd"] for t in second["tails"].values())


def test_ctrl_c_while_a_torch_module_imports_exits_130_without_raising_into_it(tmp_path: Path) -> None:
    """SIGINT inside a torch-family import ends the process in one line, never by an exception raised into it.

    A KeyboardInterrupt raised inside torch's C++ start-up aborts the process (SIGABRT, 1 in 150 Ctrl-Cs during
    `import torch`); the probe module stands in for that import and would print "raised" if the interrupt reached it.
    """
    (tmp_path / "torch_sigint_probe.py").write_text(
        "import os, signal, time\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(2)\n"
        "except KeyboardInterrupt:\n"
        "    print('raised', flush=True)\n"
        "    raise\n"
        "print('continued', flush=True)\n"
    )
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from itdcli.cli.main import _watch_interrupts\n"
        "_watch_interrupts()\n"
        "import torch_sigint_probe\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (130, ""), (done.returncode, done.stdout, done.stderr[-500:])
    assert done.stderr == "error: interrupted; no partial results were written\n"
