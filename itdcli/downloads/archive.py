"""Safe extraction of a downloaded tarball: no links, nothing outside the target, members checked by md5."""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from itdcli.downloads.manifest import digests
from itdcli.errors import ItdError


def extract(tarball: Path, dest: Path, folder: str, members: Mapping[str, str]) -> None:
    """Unpack `tarball` into a temporary sibling of `dest`, check `folder`'s member md5s, then rename it to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".itd-extract-", dir=dest.parent))
    try:
        _unpack(tarball, tmp)
        _verify(tmp / folder, members, tarball)
        _replace(tmp / folder, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(tarball: Path, into: Path) -> None:
    """Check every member, then extract them all with the `data` filter where Python has it."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            _refuse_unsafe(tar.getmembers(), into, tarball)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:  # older Python: _refuse_unsafe has already refused links, devices and escapes
                tar.extractall(into)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ItdError(f"'{tarball}' is not a readable tar archive ({exc}); delete it and download again") from exc


def _refuse_unsafe(members: Sequence[tarfile.TarInfo], into: Path, tarball: Path) -> None:
    """Refuse the whole archive if any member is a link, a device, or would land outside `into`."""
    root = into.resolve()
    for member in members:
        where = (root / member.name).resolve()
        if member.issym() or member.islnk():
            problem = "is a link"
        elif not (member.isfile() or member.isdir()):
            problem = "is not a plain file or folder"
        elif where != root and root not in where.parents:
            problem = "would land outside the target folder"
        else:
            continue
        raise ItdError(f"refusing to extract '{tarball}': member '{member.name}' {problem}; nothing was extracted")


def _verify(folder: Path, members: Mapping[str, str], tarball: Path) -> None:
    """Every expected member is in `folder` with its md5."""
    if not folder.is_dir():
        raise ItdError(f"'{tarball}' holds no {folder.name}/ folder; nothing was extracted")
    for name, want in members.items():
        path = folder / name
        if not path.is_file():
            raise ItdError(f"'{tarball}' lacks {folder.name}/{name}; nothing was extracted")
        got = digests(path)[0]
        if got != want:
            raise ItdError(f"{folder.name}/{name} in '{tarball}' has md5 {got}, expected {want}; nothing was extracted")


def _replace(new: Path, dest: Path) -> None:
    """Rename `new` onto `dest`; an old `dest` is first moved beside `new`, to be deleted with it."""
    if dest.exists() or dest.is_symlink():
        os.replace(dest, new.parent / ".old")
    os.replace(new, dest)
