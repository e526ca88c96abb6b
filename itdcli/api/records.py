"""Files: the itd home, run records written atomically (result.json + arrays.safetensors), the spectrum cache."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from itdcli import outputs
from itdcli.api.results import NllResult
from itdcli.core.gaussian import GaussianReference
from itdcli.errors import ItdError
from itdcli.paths import itd_home

RESULT_FILE = "result.json"
ARRAYS_FILE = "arrays.safetensors"


RUN_ENTRIES = frozenset({RESULT_FILE, ARRAYS_FILE, "ensemble.json", "members"})  # what an itd run folder holds


def check_out_dir(out: Path, overwrite: bool, need: int = 0) -> Path:
    """Refuse an existing output unless `overwrite`, and a location that cannot hold `need` bytes, before any work.

    `overwrite` replaces only an itd run folder (or an empty one): a folder holding anything itd did not write
    is refused, naming the first such entry, so that nothing of the user's is ever deleted. The current folder
    and the folders above it are refused too, since a run folder is replaced whole. Returns `out` made absolute.
    """
    out = outputs.absolute(out)
    if out == Path.cwd() or out in Path.cwd().parents:
        raise ItdError(f"--out '{out}' is the folder you are in (or above it): give a new folder, e.g. --out run1")
    if out.exists() and not overwrite:
        raise ItdError(f"output '{out}' already exists: choose another --out or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ItdError(f"output '{out}' is a file, not a run folder: choose another --out")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
        if foreign or (any(out.iterdir()) and not ((out / RESULT_FILE).exists() or (out / "ensemble.json").exists())):
            name = foreign[0] if foreign else next(out.iterdir()).name
            raise ItdError(
                f"'{out}' holds '{name}', which is not part of an itd run: --overwrite replaces only an itd run "
                "folder; choose another --out"
            )
    return outputs.check(out, "--out", need)


@contextlib.contextmanager
def claimed_out(out: Path | None, overwrite: bool, need: int = 0) -> Iterator[Path | None]:
    """Check `out` (when given) and hold its one-writer lock on rank 0 until the block has written it."""
    from itdcli import runtime

    if out is None:
        yield None
        return
    out = check_out_dir(out, overwrite, need)
    if not runtime.is_main():
        yield out
        return
    with outputs.claim(out, "--out"):
        yield out


def new_run_dir(model: str, data: str) -> Path:
    """A fresh folder name under the itd home's runs/ for a run without --out."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(model).name}-{Path(data).name}").strip("-")[:60]
    base = itd_home() / "runs" / f"{stamp}-{slug}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary folder onto `out`, replacing an old one only after the new one is whole."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=outputs.temp_prefix(out), dir=out.parent))
    os.replace(out, old / "run")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _publish_modes(folder: Path) -> None:
    """Give a mkdtemp folder, its subfolders and files the modes the user's umask would have given them."""
    umask = outputs.umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `out` whole, on failure it vanishes."""
    out = outputs.absolute(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.clear_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=outputs.temp_prefix(out), dir=out.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_run(result: NllResult, out: Path, remember: bool = True) -> Path:
    """Write result.json and arrays.safetensors into a temporary sibling folder, then rename it to `out`."""
    from safetensors.torch import save_file

    result.run_dir = str(out.resolve())
    with atomic_folder(out) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in result.arrays.items()}
        save_file(tensors, str(tmp / ARRAYS_FILE), metadata={"schema": result.schema_version})
        (tmp / RESULT_FILE).write_text(result.model_dump_json(indent=2) + "\n")
    if remember:
        remember_latest(out.resolve())
    return out


def remember_latest(run: Path) -> None:
    """Point the itd home's `latest-run` file at `run`, atomically."""
    home = itd_home()
    with contextlib.suppress(OSError):
        home.mkdir(parents=True, exist_ok=True)
        outputs.write_atomic(home / "latest-run", (str(run) + "\n").encode())


def latest_run() -> Path:
    """The folder of the most recent `itd nll` run on this machine."""
    pointer = itd_home() / "latest-run"
    if pointer.exists():
        run = Path(pointer.read_text().strip())
        if (run / RESULT_FILE).exists():
            return run
    raise ItdError(
        "no saved itd nll run found: run `itd nll DATA --model M` first, or give RESULT_DIR or --model/--data"
    )


def read_run(run: Path) -> NllResult:
    """Load a run record: result.json validated as NllResult, with its arrays."""
    from pydantic import ValidationError
    from safetensors.torch import load_file

    if not (run / RESULT_FILE).exists():
        raise ItdError(f"'{run}' is not an itd run folder (no {RESULT_FILE}); give a folder written by itd nll --out")
    try:
        result = NllResult.model_validate(json.loads((run / RESULT_FILE).read_text()))
    except (ValueError, ValidationError) as exc:
        raise ItdError(f"'{run / RESULT_FILE}' is not a valid itd result: {str(exc).splitlines()[0]}") from exc
    result.arrays = dict(load_file(str(run / ARRAYS_FILE))) if (run / ARRAYS_FILE).exists() else {}
    return result


def cached_reference(key: str) -> GaussianReference | None:
    """A Gaussian reference cached under the itd home by content key, if present."""
    from safetensors.torch import load_file

    path = itd_home() / "cache" / "spectra" / f"{key}.safetensors"
    if not path.exists():
        return None
    t = load_file(str(path))
    return GaussianReference(t["mean"], t["eigvecs"], t["eigvals"])


def store_reference(key: str, ref: GaussianReference) -> None:
    """Cache a fitted reference (mean, eigenvectors, eigenvalues) atomically; a failure to cache is not an error."""
    from safetensors.torch import save_file

    folder = itd_home() / "cache" / "spectra"
    # a full disk raises safetensors' own error type, not OSError; the cache is optional
    with contextlib.suppress(Exception):
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": ref.mean, "eigvecs": ref.eigvecs.contiguous(), "eigvals": ref.eigvals}
        with outputs.atomic_file(folder / f"{key}.safetensors") as tmp:
            save_file({k: v.to(torch.float64).cpu() for k, v in tensors.items()}, str(tmp))
