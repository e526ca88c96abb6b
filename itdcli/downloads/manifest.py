"""Checksums of files on disk and the small JSON manifest in which `itd download` records what it fetched."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, TypeAdapter, ValidationError

MANIFEST = "itd-manifest.json"
_CHUNK = 1 << 20


class Entry(BaseModel):
    """One download in a folder: its sha256 (or each file's, for a snapshot), size, source and commit."""

    sha256: str | None = None
    size: int | None = None
    source: str = ""
    commit: str | None = None
    files: dict[str, str] = {}


_ENTRIES = TypeAdapter(dict[str, Entry])


def digests(path: Path) -> tuple[str, str]:
    """The md5 and sha256 of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def read(folder: Path) -> dict[str, Entry]:
    """The manifest of `folder` by file name; empty when absent or unreadable (the next download rewrites it)."""
    try:
        return _ENTRIES.validate_json((folder / MANIFEST).read_bytes())
    except (OSError, ValidationError):
        return {}


def record(folder: Path, name: str, entry: Entry) -> None:
    """Add or replace the entry of `name`, writing the manifest atomically."""
    from itdcli import outputs

    with outputs.serialized(folder / MANIFEST):  # downloads of other artifacts into the folder update it too
        outputs.clear_stale(folder / MANIFEST)  # left by a killed writer: none is live while we hold the lock
        entries = read(folder) | {name: entry}
        outputs.write_atomic(folder / MANIFEST, _ENTRIES.dump_json(entries, indent=2) + b"\n")
