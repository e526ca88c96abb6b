"""Nothing lost, no surprises: `itd nll`, `itd finetune` and `itd download` killed at random moments.

Each case kills a command with SIGKILL or SIGINT (SIGTERM too for finetune) after a seeded random delay,
stratified over the command's typical duration so that startup, compute and the final write are all hit,
then checks that

- the output is absent or whole (a run folder `read_run` loads with its arrays; a checkpoint folder whose
  safetensors load and whose trainer.json parses, equal bit for bit to the uninterrupted run's checkpoint of
  that step; a downloaded file with exactly the served bytes);
- a previous output (the run an `--overwrite` replaces, the checkpoint a `--resume` continues) is intact;
- a rerun (or `--resume`) exits 0, reproduces the uninterrupted run exactly, and leaves no `.itd-tmp-`
  (or `.part`) entry beside the output;
- SIGINT gives exit 130 (or 2) promptly with one line on stderr, never a traceback.

Also two writers at once (exactly one wins, the other exits 2 at once naming another itd process) and a full
disk (RLIMIT_FSIZE in the child: a one-line error, no partial output, a previous output intact).

Commands run in children forked from a helper process that has imported itdcli and torch once (a fresh
`python -m itdcli` costs about 3 s of imports), except the SIGINT-at-startup trials of `itd nll`, which use a
real `python -m itdcli` so that Ctrl-C during the imports is covered too. Every trial loop asserts that all
of its trials passed and names the count in its message; `TRIALS_RUN` collects them for the summary test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SEED = 1234
TRIALS = 20  # per command and signal
TINY = "iddpm:channels=32,res_blocks=1,mult=1,attn=none,heads=4,dropout=0.1"
NLL = ["nll", "digits_test", "--points", "8", "--limit", "20"]
FT_STEPS, FT_SAVE = 12, 4
FT = [
    "finetune",
    "--init",
    "scratch",
    "--arch",
    TINY,
    "--batch-size",
    "32",
    "--log-every",
    "1",
    "--device",
    "cpu",
    "--save-every",
    str(FT_SAVE),
]
IDDPM_FILE = "cifar10_uncond_vlb_50M_500K.pt"  # what `itd download iddpm` fetches from a mirror
TMP_PREFIX = ".itd-tmp-"
TRIALS_RUN: dict[str, int] = {}  # case -> trials that ran (all passed, or the case's test failed)


# --------------------------------------------------------------------------------------------------------------
# running itd: children forked from a pre-imported helper, or a real `python -m itdcli`

SERVER = r"""
import json, os, resource, select, signal, sys, traceback
import torch, torch._dynamo, safetensors.torch, filelock, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import itdcli.cli.main, itdcli.api.nll, itdcli.api.finetune, itdcli.train, itdcli.download, itdcli.data
import itdcli.models.registry, itdcli.evaluation.engine
events = os.fdopen(os.dup(1), "w", buffering=1)
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 1)

def child(req):
    code = 1
    try:
        events.close()
        os.dup2(null, 0)
        for fd, name in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        if req.get("fsize") is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
        sys.argv = ["itd", *req["args"]]
        os.close(os.open(req["ready"], os.O_WRONLY | os.O_CREAT, 0o644))  # the test times its signal from here
        itdcli.cli.main.main(req["args"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with open(os.devnull, "w") as sink:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
        os._exit(code)

events.write("ready\n")
buffer = b""
while True:
    readable, _, _ = select.select([0], [], [], 0.002)
    if readable:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            req = json.loads(line)
            events.flush()
            pid = os.fork()
            if pid == 0:
                child(req)
            events.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        events.write(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}) + "\n")
"""


@dataclass
class Run:
    """One itd process: its pid, when it started, and its exit code once known (negative: killed by a signal)."""

    pid: int
    started: float
    stdout: Path
    stderr: Path
    popen: subprocess.Popen[bytes] | None = None
    server: Forkserver | None = None
    ended: float | None = None
    signalled: float | None = None  # when the test sent its signal

    def wait(self, timeout: float = 120.0) -> int:
        if self.popen is not None:
            code = self.popen.wait(timeout)
            self.ended = self.ended or time.monotonic()
            return code
        assert self.server is not None
        code, self.ended = self.server.wait(self.pid, timeout)
        return code

    def done(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is not None
        assert self.server is not None
        return self.pid in self.server.exits

    def kill(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if not self.done():
                self.signalled = time.monotonic()
                os.kill(self.pid, sig)

    @property
    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    @property
    def out(self) -> str:
        return self.stdout.read_text(errors="replace")


class Forkserver:
    """A helper that imported itdcli and torch once and forks one child per command (see SERVER)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        assert self.proc.stdout.readline() == b"ready\n", "the fork server did not start"
        self.cond = threading.Condition()
        self.pids: dict[int, int] = {}
        self.exits: dict[int, tuple[int, float]] = {}
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            with self.cond:
                if "pid" in event:
                    self.pids[event["id"]] = event["pid"]
                else:
                    self.exits[event["exit"]] = (event["code"], time.monotonic())
                self.cond.notify_all()

    def spawn(self, args: list[str], cwd: Path, env: dict[str, str], fsize: int | None = None) -> Run:
        with self.cond:
            self.next_id += 1
            ident = self.next_id
        stdout, stderr, ready = (cwd / f".{kind}-{ident}.txt" for kind in ("out", "err", "ready"))
        req = {"id": ident, "args": args, "cwd": str(cwd), "env": env, "fsize": fsize}
        req |= {"stdout": str(stdout), "stderr": str(stderr), "ready": str(ready)}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        with self.cond:
            assert self.cond.wait_for(lambda: ident in self.pids, 30), "the fork server did not answer"
            pid = self.pids.pop(ident)
        end = time.monotonic() + 30
        while not ready.exists() and pid not in self.exits and time.monotonic() < end:
            time.sleep(0.0005)  # the child is set up (output files, environment) and is about to call itd's main
        return Run(pid, time.monotonic(), stdout, stderr, server=self)

    def wait(self, pid: int, timeout: float) -> tuple[int, float]:
        with self.cond:
            if not self.cond.wait_for(lambda: pid in self.exits, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"itd (pid {pid}) still running after {timeout} s")
            return self.exits[pid]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server() -> Iterator[Forkserver]:
    fs = Forkserver({**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    yield fs
    fs.close()


@dataclass
class Itd:
    """Runs `itd ARGS` with a fixed environment (this test's ITD_HOME, one thread) in a working folder."""

    server: Forkserver
    home: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {**os.environ, "ITD_HOME": str(self.home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.env.pop("ITD_DEBUG", None)

    def start(self, *args: str, fsize: int | None = None, env: dict[str, str] | None = None) -> Run:
        return self.server.spawn(list(args), self.cwd, {**self.env, **(env or {})}, fsize)

    def real(self, *args: str) -> Run:
        """A fresh `python -m itdcli ARGS` (its imports included), for Ctrl-C during startup."""
        n = len(list(self.cwd.glob(".real-out-*")))
        stdout, stderr = self.cwd / f".real-out-{n}.txt", self.cwd / f".real-err-{n}.txt"
        with stdout.open("wb") as so, stderr.open("wb") as se:
            popen = subprocess.Popen(
                [sys.executable, "-m", "itdcli", *args], cwd=self.cwd, env=self.env, stdout=so, stderr=se
            )
        return Run(popen.pid, time.monotonic(), stdout, stderr, popen=popen)

    def ok(self, *args: str, **kw: Any) -> Run:
        run = self.start(*args, **kw)
        code = run.wait()
        assert code == 0, f"itd {' '.join(args)} exited {code}: {run.err[-2000:]}"
        return run


@pytest.fixture
def itd(server: Forkserver, tmp_path: Path) -> Itd:
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    return Itd(server, tmp_path / "home", tmp_path / "work")


def delays(rng: random.Random, n: int, lo: float, hi: float) -> list[float]:
    """n seeded random delays in [lo, hi], one in each of n equal strata (so the whole run is covered)."""
    width = (hi - lo) / n
    out = [lo + width * (i + rng.random()) for i in range(n)]
    rng.shuffle(out)
    return out


def kill_after(run: Run, delay: float, sig: int) -> bool:
    """Send `sig` `delay` seconds after the run started; whether it was still running then."""
    time.sleep(max(0.0, run.started + delay - time.monotonic()))
    alive = not run.done()
    run.kill(sig)
    return alive


def kill_when(run: Run, ready: Any, sig: int, limit: float = 60.0) -> bool:
    """Send `sig` as soon as `ready()` holds (polled about every 0.2 ms); whether the run was still going then."""
    end = time.monotonic() + limit
    while not run.done() and time.monotonic() < end:
        if ready():
            alive = not run.done()
            run.kill(sig)
            return alive
        time.sleep(0.0002)
    return False


def has_entry(folder: Path, prefix: str) -> Any:
    """A probe: whether `folder` holds an entry whose name starts with `prefix`."""

    def probe() -> bool:
        with contextlib.suppress(OSError):
            return any(name.startswith(prefix) for name in os.listdir(folder))
        return False

    return probe


def one_line_error(err: str) -> str:
    """stderr of a failed itd: no traceback and exactly one non-empty line, which is returned."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    return lines[0]


def temporaries(folder: Path) -> list[str]:
    """Entries of `folder` that a writer uses while writing (and must not leave behind)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX) or p.name.endswith(".part"))


def check_all(case: str, failures: list[str], trials: int) -> None:
    """Record the case's trial count and fail with every failed trial named."""
    TRIALS_RUN[case] = trials
    assert not failures, f"{case}: {len(failures)} of {trials} trials failed:\n" + "\n".join(failures)


def trial(failures: list[str], label: str) -> contextlib.AbstractContextManager[None]:
    """Run one trial's checks, collecting an AssertionError as a failure line instead of stopping the loop."""

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except AssertionError as exc:
            failures.append(f"{label}: {str(exc).strip()[:600]}")

    return guard()


# --------------------------------------------------------------------------------------------------------------
# itd nll

Signature = tuple[str, dict[str, bytes]]


def run_signature(path: Path) -> Signature:
    """A whole run folder's estimates (JSON) and array bytes: `read_run` must load it and its arrays."""
    from itdcli.api.records import read_run

    result = read_run(path)
    assert result.arrays, f"{path} has no arrays"
    assert sorted(p.name for p in path.iterdir()) == ["arrays.safetensors", "result.json"], sorted(path.iterdir())
    estimates = json.dumps({k: v.model_dump() for k, v in result.estimates.items()}, sort_keys=True)
    arrays = {k: v.numpy().tobytes() for k, v in sorted(result.arrays.items())}
    return estimates, arrays


def nll_args(out: Path, seed: int, *extra: str) -> list[str]:
    return [*NLL, "--seed", str(seed), "--out", str(out), *extra]


@pytest.fixture
def nll_refs(itd: Itd) -> dict[int, Signature]:
    """The uninterrupted runs of seeds 1 and 2 (the old and the new run of an --overwrite) in ref-SEED/run."""
    refs = {}
    for seed in (1, 2):
        out = itd.cwd / f"ref-{seed}" / "run"
        itd.ok(*nll_args(out, seed))
        refs[seed] = run_signature(out)
    assert refs[1] != refs[2]
    return refs


def typical(itd: Itd, *args: str, env: dict[str, str] | None = None) -> float:
    """Seconds `itd ARGS` takes here (the longer of two runs into fresh folders; `{}` in ARGS is the folder)."""
    times = []
    for i in range(2):
        folder = itd.cwd / f"timing-{len(list(itd.cwd.glob('timing-*')))}-{i}"
        run = itd.ok(*(a.replace("{}", str(folder)) for a in args), env=env)
        assert run.ended is not None
        times.append(run.ended - run.started)
    return max(times)


def check_nll_after_kill(out: Path, refs: dict[int, Signature], previous: int | None) -> None:
    """The output is absent (only when there was none before) or whole: the old run or the new one, exactly."""
    if not out.exists():
        assert previous is None, f"the previous run in {out} is gone (parent holds {sorted(os.listdir(out.parent))})"
        return
    sig = run_signature(out)
    allowed = {2} if previous is None else {previous, 2}
    assert any(sig == refs[s] for s in allowed), f"{out} holds a run that is neither the old nor the new one"


def rerun_nll(itd: Itd, out: Path, refs: dict[int, Signature]) -> None:
    """The same command again (with --overwrite, since a whole run may be there) exits 0 and leaves no temporaries."""
    run = itd.start(*nll_args(out, 2, "--overwrite"))
    code = run.wait()
    assert code == 0, f"rerun exited {code}: {run.err[-1000:]}"
    assert run_signature(out) == refs[2], "the rerun's output differs from the uninterrupted run"
    assert temporaries(out.parent) == [], f"left in {out.parent} after the rerun: {temporaries(out.parent)}"


def check_sigint_exit(run: Run, code: int, last_line_only: bool = False) -> str | None:
    """Ctrl-C: exit 130 (or 2) promptly, with one line on stderr (the last, after progress lines) and no traceback.

    Death by SIGINT itself (-2, which a shell also shows as 130) is accepted when no traceback was printed: Python
    restores the default SIGINT action while it shuts down, so a Ctrl-C after the work is done ends it that way.
    Returns the error line, or None when stderr is empty (only accepted for -2).
    """
    err = run.err
    assert code in (130, 2, -signal.SIGINT), f"exit {code} after SIGINT, not 130 or 2: {err[-1500:]}"
    assert "Traceback" not in err, f"exit {code} with a traceback: ...{err[-1200:]}"
    assert run.ended is not None and run.signalled is not None
    assert run.ended - run.signalled < 15, f"took {run.ended - run.signalled:.1f} s to stop after the signal"
    lines = [line for line in err.splitlines() if line.strip()]
    if not lines:
        assert code == -signal.SIGINT, f"exit {code} and nothing on stderr"
        return None
    if last_line_only:
        assert not any(line.startswith("error:") for line in lines[:-1]), err
    else:
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[-1].startswith("error: "), lines[-1]
    return lines[-1]


def nll_trial(itd: Itd, refs: dict[int, Signature], i: int, sig: int, when: Any, real: bool = False) -> bool:
    """Kill one `itd nll` (odd trials replace a whole earlier run with --overwrite), check, rerun; whether it hit."""
    folder = itd.cwd / f"t{i}"
    folder.mkdir()
    out = folder / "run"
    previous = None
    if i % 2:
        shutil.copytree(itd.cwd / "ref-1" / "run", out)
        previous = 1
    args = nll_args(out, 2, *(["--overwrite"] if previous else []))
    run = itd.real(*args) if real else itd.start(*args)
    hit = when(run)
    code = run.wait(60)
    if sig == signal.SIGINT and hit and code != 0:
        check_sigint_exit(run, code)
    elif sig == signal.SIGKILL:
        assert code in (0, -signal.SIGKILL), f"exit {code}: {run.err[-500:]}"
    else:
        assert code == 0, f"exit {code}: {run.err[-500:]}"
    check_nll_after_kill(out, refs, previous)
    rerun_nll(itd, out, refs)
    return hit


def nll_kill_trials(itd: Itd, refs: dict[int, Signature], sig: int, case: str) -> None:
    rng = random.Random(SEED + sig)
    took = typical(itd, *nll_args(Path("{}"), 1))
    failures: list[str] = []
    hit = 0
    for i, delay in enumerate(delays(rng, TRIALS, 0.05, took)):
        label = f"trial {i} ({signal.Signals(sig).name} after {delay:.3f} s, {'--overwrite' if i % 2 else 'new'})"
        with trial(failures, label):
            hit += nll_trial(itd, refs, i, sig, lambda run, d=delay: kill_after(run, d, sig))
    check_all(case, failures, TRIALS)
    assert hit >= TRIALS // 2, f"{case}: only {hit} of {TRIALS} kills landed while itd ran (typical {took:.2f} s)"


def test_nll_killed_with_sigkill_leaves_nothing_partial(itd: Itd, nll_refs: dict[int, Signature]) -> None:
    nll_kill_trials(itd, nll_refs, signal.SIGKILL, "nll SIGKILL")


def test_nll_killed_while_writing_keeps_the_old_or_the_new_run(itd: Itd, nll_refs: dict[int, Signature]) -> None:
    """SIGKILL as soon as the run's temporary folder appears: the kill lands inside write_run, every time."""
    failures: list[str] = []
    n, hit = 10, 0
    for i in range(n):
        label = f"trial {i} (SIGKILL once .itd-tmp-run.* exists, {'--overwrite' if i % 2 else 'new'})"
        probe = has_entry(itd.cwd / f"t{i}", f"{TMP_PREFIX}run.")
        with trial(failures, label):
            hit += nll_trial(itd, nll_refs, i, signal.SIGKILL, lambda run, p=probe: kill_when(run, p, signal.SIGKILL))
    check_all("nll SIGKILL during the write", failures, n)
    assert hit >= n // 2, f"only {hit} of {n} kills landed during the write"


def test_nll_interrupted_with_sigint_exits_in_one_line(itd: Itd, nll_refs: dict[int, Signature]) -> None:
    nll_kill_trials(itd, nll_refs, signal.SIGINT, "nll SIGINT")


def test_nll_ctrl_c_during_startup_is_one_line(itd: Itd, nll_refs: dict[int, Signature]) -> None:
    """A real `python -m itdcli nll` (imports included) interrupted across its whole run, startup first."""
    rng = random.Random(SEED)
    probe = itd.real(*nll_args(itd.cwd / "timing-real" / "run", 1))
    assert probe.wait() == 0, probe.err
    full = (probe.ended or time.monotonic()) - probe.started
    moments = sorted(delays(rng, 4, 0.05, 0.6) + delays(rng, 6, 0.6, full))  # the imports take the first ~0.5 s
    n = len(moments)
    failures: list[str] = []
    for i, delay in enumerate(moments):
        with trial(failures, f"trial {i} (SIGINT after {delay:.3f} s of a {full:.2f} s python -m itdcli nll)"):
            nll_trial(itd, nll_refs, i, signal.SIGINT, lambda run, d=delay: kill_after(run, d, signal.SIGINT), True)
    check_all("nll SIGINT, real process", failures, n)


# --------------------------------------------------------------------------------------------------------------
# itd finetune

Checkpoint = dict[str, dict[str, Any]]
CKPT_FILES = ("raw.safetensors", "model.safetensors", "trainer.safetensors")


def ft_args(out: Path, steps: int = FT_STEPS, *extra: str) -> list[str]:
    return [*FT, "--steps", str(steps), "--out", str(out), *extra]


def load_checkpoint(out: Path) -> tuple[int, Checkpoint]:
    """A whole checkpoint folder: its step (trainer.json) and every tensor of its safetensors files."""
    from safetensors.torch import load_file

    folder = out / "checkpoint"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["itd-model.json", "trainer.json", *CKPT_FILES]), f"{folder} holds {names}"
    json.loads((folder / "itd-model.json").read_text())
    step = int(json.loads((folder / "trainer.json").read_text())["step"])
    return step, {name: load_file(str(folder / name)) for name in CKPT_FILES}


def same_checkpoint(a: Checkpoint, b: Checkpoint) -> bool:
    import torch

    return all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]) for f in CKPT_FILES)


def metric_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss_bpd" in json.loads(line)]


@dataclass
class FtRefs:
    """The uninterrupted run: its checkpoints at steps 4, 8 and 12 and a copy of its folder at step 4."""

    checkpoints: dict[int, Checkpoint]
    at_4: Path
    took: float


@pytest.fixture(scope="module")
def ft_refs(server: Forkserver, tmp_path_factory: pytest.TempPathFactory) -> FtRefs:
    base = tmp_path_factory.mktemp("ft-refs")
    (base / "home").mkdir()
    (base / "work").mkdir()
    itd = Itd(server, base / "home", base / "work")
    straight = itd.ok(*ft_args(base / "straight"))
    assert straight.ended is not None
    chain, checkpoints = base / "chain", {}
    for steps in range(FT_SAVE, FT_STEPS + 1, FT_SAVE):
        itd.ok(*ft_args(chain, steps, *(["--resume"] if steps > FT_SAVE else [])))
        step, checkpoints[steps] = load_checkpoint(chain)
        assert step == steps
        if steps == FT_SAVE:
            shutil.copytree(chain, base / "at-4")
    assert same_checkpoint(load_checkpoint(base / "straight")[1], checkpoints[FT_STEPS]), "resume is not exact"
    assert metric_steps(base / "straight") == metric_steps(chain) == list(range(1, FT_STEPS + 1))
    return FtRefs(checkpoints, base / "at-4", straight.ended - straight.started)


def check_ft_after_kill(out: Path, refs: FtRefs, previous: int | None, exact_steps: bool = True) -> int | None:
    """The checkpoint is absent (only when none was there) or whole, equal to the uninterrupted run's of its step."""
    if not (out / "checkpoint").exists():
        assert previous is None, f"the previous checkpoint in {out} is gone (it holds {sorted(os.listdir(out))})"
        return None
    step, ckpt = load_checkpoint(out)
    if previous is not None:
        assert step >= previous, f"the checkpoint went back from step {previous} to {step}"
    if exact_steps or step in refs.checkpoints:
        assert step in refs.checkpoints, f"checkpoint at step {step}, not a save step"
        assert same_checkpoint(ckpt, refs.checkpoints[step]), f"the step-{step} checkpoint differs from the reference"
    return step


def finish_ft(itd: Itd, out: Path, refs: FtRefs, step: int | None, before: str = "") -> None:
    """`--resume` (or, with no checkpoint saved, the same command again) exits 0 and reproduces the reference."""
    args = ft_args(out, FT_STEPS, "--resume") if step is not None else ft_args(out)
    run = itd.start(*args)
    code = run.wait()
    how = "--resume" if step is not None else "the same command (no checkpoint was saved)"
    said = f"; the killed run had said {before!r}" if before else ""
    assert code == 0, f"{how} exited {code} (checkpoint at step {step}): {run.err.strip().splitlines()[-1:]}{said}"
    final_step, ckpt = load_checkpoint(out)
    assert final_step == FT_STEPS and same_checkpoint(ckpt, refs.checkpoints[FT_STEPS]), "not bit for bit"
    assert metric_steps(out) == list(range(1, FT_STEPS + 1)), f"metrics.jsonl steps {metric_steps(out)}"
    assert temporaries(out) == [] and temporaries(out.parent) == [], (temporaries(out), temporaries(out.parent))


def ft_trial(itd: Itd, refs: FtRefs, i: int, sig: int, when: Any, resume: bool) -> bool:
    """Kill one `itd finetune` (a fresh run, or a --resume from the step-4 checkpoint), check, finish; hit or not."""
    out = itd.cwd / f"t{i}" / "ft"
    out.parent.mkdir()
    previous = None
    if resume:
        shutil.copytree(refs.at_4, out)
        previous = FT_SAVE
    run = itd.start(*ft_args(out, FT_STEPS, *(["--resume"] if resume else [])))
    hit = when(run)
    code = run.wait(120)
    if sig == signal.SIGKILL:
        assert code in (0, -signal.SIGKILL), f"exit {code}: {run.err[-500:]}"
    elif hit and code != 0 and not (sig == signal.SIGTERM and code == -signal.SIGTERM):
        line = check_sigint_exit(run, code, last_line_only=True) or ""
        if (out / "checkpoint").exists() and "stopped by" in line:
            assert "--resume" in line, line
    step = check_ft_after_kill(out, refs, previous, exact_steps=sig == signal.SIGKILL)
    if code == 0:  # the signal came after the run had finished: it must be the whole, exact run
        assert step == FT_STEPS and same_checkpoint(load_checkpoint(out)[1], refs.checkpoints[FT_STEPS])
        assert metric_steps(out) == list(range(1, FT_STEPS + 1)) and temporaries(out) == []
        return hit
    last = run.err.strip().splitlines()[-1:]
    finish_ft(itd, out, refs, step, f"exit {code}: {last[0]}" if last else f"exit {code}")
    return hit


def test_finetune_killed_with_sigkill_keeps_whole_checkpoints(itd: Itd, ft_refs: FtRefs) -> None:
    rng = random.Random(SEED + 9)
    failures: list[str] = []
    hit = 0
    for i, delay in enumerate(delays(rng, TRIALS, 0.05, ft_refs.took)):
        resume = bool(i % 2)
        with trial(failures, f"trial {i} (SIGKILL after {delay:.2f} s, {'--resume from step 4' if resume else 'new'})"):
            hit += ft_trial(
                itd, ft_refs, i, signal.SIGKILL, lambda r, d=delay: kill_after(r, d, signal.SIGKILL), resume
            )
    check_all("finetune SIGKILL", failures, TRIALS)
    assert hit >= TRIALS // 2, f"only {hit} of {TRIALS} kills landed while finetune ran"


def test_finetune_killed_while_saving_keeps_the_previous_checkpoint(itd: Itd, ft_refs: FtRefs) -> None:
    """SIGKILL as soon as the step-8 save's temporary folder appears, in runs resumed from step 4."""
    failures: list[str] = []
    n, hit = 6, 0
    for i in range(n):
        probe = has_entry(itd.cwd / f"t{i}" / "ft", f"{TMP_PREFIX}checkpoint.")
        with trial(failures, f"trial {i} (SIGKILL once .itd-tmp-checkpoint.* exists, --resume from step 4)"):
            hit += ft_trial(itd, ft_refs, i, signal.SIGKILL, lambda r, p=probe: kill_when(r, p, signal.SIGKILL), True)
    check_all("finetune SIGKILL during a save", failures, n)
    assert hit >= n // 2, f"only {hit} of {n} kills landed during a save"


def ft_interrupt_trials(itd: Itd, refs: FtRefs, sig: int, n: int, case: str) -> None:
    rng = random.Random(SEED + 100 + sig)
    failures: list[str] = []
    hit = 0
    for i, delay in enumerate(delays(rng, n, 0.05, refs.took)):
        with trial(failures, f"trial {i} ({signal.Signals(sig).name} after {delay:.2f} s, then --resume)"):
            hit += ft_trial(itd, refs, i, sig, lambda r, d=delay: kill_after(r, d, sig), resume=False)
    check_all(case, failures, n)
    assert hit >= n // 2, f"only {hit} of {n} signals landed while finetune ran"


def test_finetune_sigint_then_resume_is_bit_for_bit(itd: Itd, ft_refs: FtRefs) -> None:
    ft_interrupt_trials(itd, ft_refs, signal.SIGINT, TRIALS, "finetune SIGINT + --resume, bit for bit")


def test_finetune_sigterm_then_resume_is_bit_for_bit(itd: Itd, ft_refs: FtRefs) -> None:
    ft_interrupt_trials(itd, ft_refs, signal.SIGTERM, 6, "finetune SIGTERM + --resume, bit for bit")


# --------------------------------------------------------------------------------------------------------------
# itd download

BODY = random.Random(SEED).randbytes(3 * 2**20)
SLICE, PAUSE = 64 * 2**10, 0.008  # the server sends 64 KiB, then waits 8 ms: about 0.4 s for the whole body


@dataclass
class Mirror:
    url: str
    requests: list[str | None] = field(default_factory=list)


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    """A slow HTTP mirror on 127.0.0.1 serving BODY as the IDDPM checkpoint, with Range (resume) support."""
    site = Mirror("")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            site.requests.append(self.headers.get("Range"))
            if self.path.lstrip("/") != IDDPM_FILE:
                self.send_error(404, "Not Found")
                return
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            start = int(match[1]) if match and int(match[1]) < len(BODY) else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
            self.send_header("Content-Length", str(len(BODY) - start))
            self.end_headers()
            with contextlib.suppress(OSError):
                for at in range(start, len(BODY), SLICE):
                    self.wfile.write(BODY[at : at + SLICE])
                    time.sleep(PAUSE)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    site.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield site
    server.shutdown()
    server.server_close()


def dl_args(folder: Path, *extra: str) -> list[str]:
    return ["download", "iddpm", "--dir", str(folder), *extra]


def check_download(folder: Path, previous: bool) -> None:
    """The file is absent (only when it was not there before) or holds exactly the served bytes."""
    target = folder / IDDPM_FILE
    if not target.exists():
        assert not previous, f"the previous download {target} is gone"
        return
    data = target.read_bytes()
    assert data == BODY, f"{target} holds {len(data):,} bytes that are not the served file's {len(BODY):,}"


def finish_download(itd: Itd, folder: Path, env: dict[str, str]) -> None:
    run = itd.start(*dl_args(folder), env=env)
    code = run.wait()
    assert code == 0, f"the rerun exited {code}: {run.err[-800:]}"
    assert (folder / IDDPM_FILE).read_bytes() == BODY, "the rerun's file differs from the served one"
    left = sorted(os.listdir(folder))
    said = "already there" if "already there" in run.out else "downloaded"
    assert left == sorted([IDDPM_FILE, "itd-manifest.json"]), (
        f"the rerun `itd download iddpm --dir DIR` exited 0 ({said}) but {folder} still holds {left}"
    )
    entry = json.loads((folder / "itd-manifest.json").read_text())[IDDPM_FILE]
    assert entry["sha256"] == hashlib.sha256(BODY).hexdigest()


def download_trials(itd: Itd, mirror: Mirror, sig: int, case: str) -> None:
    env = {"ITD_MIRROR": mirror.url}
    done = itd.cwd / "complete"
    itd.ok(*dl_args(done), env=env)
    assert (done / IDDPM_FILE).read_bytes() == BODY
    took = typical(itd, *dl_args(Path("{}")), env=env)
    rng = random.Random(SEED + 200 + sig)
    failures: list[str] = []
    hit = 0
    for i, delay in enumerate(delays(rng, TRIALS, 0.05, took)):
        folder = itd.cwd / f"t{i}"
        previous = bool(i % 2)  # odd trials: --force over a verified copy
        if previous:
            shutil.copytree(done, folder)
        with trial(
            failures, f"trial {i} ({signal.Signals(sig).name} after {delay:.3f} s, {'--force' if previous else 'new'})"
        ):
            run = itd.start(*dl_args(folder, *(["--force"] if previous else [])), env=env)
            landed = kill_after(run, delay, sig)
            hit += landed
            code = run.wait(60)
            if sig == signal.SIGKILL:
                assert code in (0, -signal.SIGKILL), f"exit {code}: {run.err[-500:]}"
            elif landed and code != 0:
                check_sigint_exit(run, code)
            check_download(folder, previous)
            finish_download(itd, folder, env)
    check_all(case, failures, TRIALS)
    assert hit >= TRIALS // 2, f"only {hit} of {TRIALS} kills landed while the download ran (typical {took:.2f} s)"


def test_download_killed_with_sigkill_then_rerun(itd: Itd, mirror: Mirror) -> None:
    download_trials(itd, mirror, signal.SIGKILL, "download SIGKILL")


def test_download_interrupted_with_sigint_then_rerun(itd: Itd, mirror: Mirror) -> None:
    download_trials(itd, mirror, signal.SIGINT, "download SIGINT")


# --------------------------------------------------------------------------------------------------------------
# two writers at once


def race(itd: Itd, args: list[str]) -> tuple[Run, Run]:
    """Start `itd ARGS` twice at once; (the one that exited 0, the one that did not)."""
    a, b = itd.start(*args), itd.start(*args)
    codes = {a.pid: a.wait(), b.pid: b.wait()}
    winners = [r for r in (a, b) if codes[r.pid] == 0]
    losers = [r for r in (a, b) if codes[r.pid] != 0]
    assert len(winners) == 1, f"exits {sorted(codes.values())}: {a.err[-500:]} / {b.err[-500:]}"
    loser = losers[0]
    assert codes[loser.pid] == 2, f"the second writer exited {codes[loser.pid]}: {loser.err[-500:]}"
    line = one_line_error(loser.err)
    assert "another itd process" in line, line
    winner = winners[0]
    assert loser.ended is not None and winner.ended is not None
    assert loser.ended < winner.ended, "the second writer waited for the first instead of failing at once"
    return winner, loser


def test_two_nll_writers_one_wins_the_other_fails_at_once(itd: Itd, nll_refs: dict[int, Signature]) -> None:
    n = 5
    for i in range(n):
        out = itd.cwd / f"race-{i}" / "run"
        race(itd, [*NLL[:-1], "200", "--seed", "2", "--out", str(out)])
        assert run_signature(out)[1].keys() == nll_refs[2][1].keys()
        assert temporaries(out.parent) == []
    TRIALS_RUN["two nll writers"] = n


def test_two_finetune_writers_one_wins_the_other_fails_at_once(itd: Itd, ft_refs: FtRefs) -> None:
    n = 2
    for i in range(n):
        out = itd.cwd / f"race-{i}" / "ft"
        race(itd, ft_args(out))
        step, ckpt = load_checkpoint(out)
        assert step == FT_STEPS and same_checkpoint(ckpt, ft_refs.checkpoints[FT_STEPS])
        assert metric_steps(out) == list(range(1, FT_STEPS + 1)) and temporaries(out) == []
    TRIALS_RUN["two finetune writers"] = n


# --------------------------------------------------------------------------------------------------------------
# a full disk: RLIMIT_FSIZE in the child, SIGXFSZ ignored, so that writes fail with EFBIG


def test_nll_on_a_full_disk_fails_in_one_line_and_keeps_the_old_run(itd: Itd, nll_refs: dict[int, Signature]) -> None:
    limit = 8192  # below arrays.safetensors (about 35 kB)
    new = itd.cwd / "full-new" / "run"
    run = itd.start(*nll_args(new, 2), fsize=limit)
    code = run.wait()
    assert code != 0, "itd nll succeeded although its arrays could not be written"
    one_line_error(run.err)
    assert not new.exists() and temporaries(new.parent) == [], sorted(os.listdir(new.parent))
    old = itd.cwd / "full-old" / "run"
    shutil.copytree(itd.cwd / "ref-1" / "run", old)
    run = itd.start(*nll_args(old, 2, "--overwrite"), fsize=limit)
    code = run.wait()
    assert code != 0, "itd nll --overwrite succeeded although its arrays could not be written"
    one_line_error(run.err)
    assert run_signature(old) == nll_refs[1], "the previous run was changed"
    assert temporaries(old.parent) == [], temporaries(old.parent)
    rerun_nll(itd, old, nll_refs)
    TRIALS_RUN["nll full disk"] = 2


def test_finetune_on_a_full_disk_keeps_the_previous_checkpoint(itd: Itd, ft_refs: FtRefs) -> None:
    out = itd.cwd / "full" / "ft"
    shutil.copytree(ft_refs.at_4, out)
    run = itd.start(*ft_args(out, FT_STEPS, "--resume"), fsize=2**20)  # below trainer.safetensors (1.5 MB)
    code = run.wait()
    assert code not in (0, 130), "itd finetune succeeded although its checkpoint could not be written"
    err = run.err
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error")] == [err.strip().splitlines()[-1]], err
    step, ckpt = load_checkpoint(out)
    assert step == FT_SAVE and same_checkpoint(ckpt, ft_refs.checkpoints[FT_SAVE]), "the step-4 checkpoint changed"
    assert temporaries(out) == [], temporaries(out)
    finish_ft(itd, out, ft_refs, step)
    TRIALS_RUN["finetune full disk"] = 1


def test_download_on_a_full_disk_fails_in_one_line(itd: Itd, mirror: Mirror) -> None:
    env = {"ITD_MIRROR": mirror.url}
    folder = itd.cwd / "full"
    run = itd.start(*dl_args(folder), env=env, fsize=2**20)
    code = run.wait()
    assert code != 0, "itd download succeeded although the file could not be written"
    one_line_error(run.err)
    assert not (folder / IDDPM_FILE).exists()
    finish_download(itd, folder, env)
    TRIALS_RUN["download full disk"] = 1


# --------------------------------------------------------------------------------------------------------------


def test_summary_of_trials() -> None:
    """Runs last: the trials per case (each case's own test failed if any of its trials did)."""
    print("\nfault trials per case:")
    for case, n in TRIALS_RUN.items():
        print(f"  {case}: {n}")
    random_kills = [c for c in TRIALS_RUN if c.split()[0] in ("nll", "finetune", "download") and "SIG" in c]
    assert all(TRIALS_RUN[c] >= 6 for c in random_kills), TRIALS_RUN
