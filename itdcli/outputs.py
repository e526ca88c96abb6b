"""Output locations: validated before any work and held by one writer at a time (docs/commands.md, Safety).

Every command that writes (a run folder, a figure, a checkpoint folder, a download) first calls `check`:
the location must sit on a real, writable filesystem with room for what will be written. `claim` then
holds an exclusive lock (filelock) for the location until the write is done, so that a second itd writing
to the same place fails at once instead of silently replacing the first one's result. The lock files live
under the itd home, never beside the user's files, so nothing is left behind in the output's folder.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from itdcli.errors import ItdError
from itdcli.paths import itd_home

# pseudo-filesystems that hold no files of their own: writing there fails, or vanishes at reboot
SPECIAL_FILESYSTEMS = frozenset(
    {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "securityfs", "tracefs", "configfs"}
    | {"fusectl", "pstore", "bpf", "mqueue", "autofs", "binfmt_misc", "efivarfs", "rpc_pipefs", "nsfs"}
)
SPACE_MARGIN = 16 * 2**20  # bytes kept free beyond an estimate, for the filesystem's own bookkeeping


def absolute(path: Path) -> Path:
    """`path` made absolute without resolving links, so that `--out .` names the current folder itself."""
    return Path(os.path.abspath(path.expanduser()))


def existing_ancestor(path: Path) -> Path:
    """The nearest folder at or above `path` that exists."""
    probe = absolute(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem mounted at the longest mount point above `path` (Linux mountinfo), if known."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = str(Path(os.path.realpath(path))), "", None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, line.split(" - ", 1)[1].split()[0]
    return kind


def _probe_write(folder: Path) -> str | None:
    """Create and remove a temporary folder in `folder`; the OS's reason when that fails."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".itd-probe-", dir=folder))
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def check(path: Path, flag: str, need: int = 0, example: str | None = None) -> Path:
    """Fail in one line unless `path` can be created and filled with `need` bytes; returns it made absolute.

    Checked before any work: the nearest existing folder above it is a folder on a storage filesystem,
    a probe folder can be made and removed there, and the filesystem has `need` bytes plus a margin free.
    `example` is the value the advice suggests for `flag` (default: `path`'s name in the current folder).
    """
    path = absolute(path)
    folder = existing_ancestor(path.parent)
    kind = filesystem_type(folder)
    if kind in SPECIAL_FILESYSTEMS:
        suggestion = example or str(Path.cwd() / path.name)
        raise ItdError(
            f"{flag} '{path}' is on {folder}, a {kind} pseudo-filesystem that stores no files: choose a folder on a "
            f"disk, e.g. {flag} {suggestion}"
        )
    if not folder.is_dir():
        raise ItdError(f"cannot write {flag} '{path}': '{folder}' is a file, not a folder; choose another {flag}")
    reason = _probe_write(folder)
    if reason is not None:
        raise ItdError(f"cannot write in '{folder}' ({reason}): choose a writable {flag}")
    require_space(folder, need, f"{flag} '{path}'", flag)
    return path


def require_space(folder: Path, need: int, what: str, flag: str, margin: int = SPACE_MARGIN) -> None:
    """Fail in one line unless the filesystem of `folder` (or its nearest existing ancestor) has `need` + `margin`."""
    probe = existing_ancestor(folder)
    free = shutil.disk_usage(probe).free
    if free < max(need, 0) + margin:
        raise ItdError(
            f"not enough free space for {what}: about {_mb(max(need, 0) + margin)} is needed, {_mb(free)} is free "
            f"in {probe}; free some space or choose another {flag} on a disk with room"
        )


def _mb(size: int) -> str:
    """Bytes as megabytes."""
    return f"{size / 1e6:,.1f} MB"


def _lock_file(path: Path) -> Path:
    """The lock file of an output location, under the itd home (or the system's temporary folder)."""
    key = hashlib.sha256(str(absolute(path)).encode()).hexdigest()[:32]
    for folder in (itd_home() / "locks", Path(tempfile.gettempdir()) / f"itd-locks-{os.getuid()}"):
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder / f"{key}.lock"
    raise ItdError(f"cannot create a lock for '{path}': make the itd home ({itd_home()}) writable or set ITD_HOME")


@contextlib.contextmanager
def claim(path: Path, flag: str) -> Iterator[Path]:
    """Hold the one-writer lock of `path` while the block writes it; a second writer fails at once in one line."""
    from filelock import FileLock, Timeout

    path = absolute(path)
    lock = FileLock(str(_lock_file(path)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ItdError(
            f"another itd process is writing {flag} '{path}' right now: wait for it to finish, or choose another {flag}"
        ) from None
    try:
        clear_stale(path)
        yield path
    finally:
        lock.release()


@contextlib.contextmanager
def serialized(path: Path, timeout: float = 120.0) -> Iterator[None]:
    """Wait for, then hold, the lock of `path`: for short read-modify-writes that several outputs share (a manifest)."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(_lock_file(path)), timeout=timeout):
            yield
    except Timeout:
        raise ItdError(f"'{path}' stayed locked by another itd process for {timeout:.0f} s: try again") from None


def temp_prefix(path: Path) -> str:
    """The name prefix of the temporary siblings a write of `path` fills before renaming them onto it."""
    return f".itd-tmp-{path.name}."


def clear_stale(path: Path) -> None:
    """Remove temporary siblings of `path` that a killed writer left; only the holder of its lock may call this."""
    prefix, path = temp_prefix(path), absolute(path)
    for entry in path.parent.glob(glob.escape(prefix) + "*"):
        if not re.fullmatch(r"[A-Za-z0-9_]{8}(\.[A-Za-z0-9]+)?", entry.name[len(prefix) :]):
            continue  # another output's temporary (e.g. of 'run.2' when this is 'run')
        if not path.exists() and (entry / "run").is_dir():  # killed between moving the old run aside and the new in
            with contextlib.suppress(OSError):
                os.replace(entry / "run", path)
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a file made by mkstemp (mode 0600) the mode the user's umask would have given it."""
    os.chmod(path, 0o666 & ~umask())


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it is renamed onto `path`, on failure removed.

    A kill leaves the old file or the new one. The temporary keeps `path`'s suffix (writers that pick a format
    by it, such as matplotlib, see the real one) and is named with `temp_prefix`, so `clear_stale` removes one a
    killed writer left.
    """
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` as `path` whole, through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
