"""`itd download`: the pretrained checkpoints and CIFAR-10, verified, resumable and never half-written.

Where things go (the itd home is ITD_HOME, else ~/.cache/itd; see `itdcli.paths`):

- iddpm, iddpm-hybrid: `<itd home>/models/<checkpoint>.pt` (`paths.iddpm_checkpoint(name)`);
- ddpm: `<itd home>/models/ddpm-cifar10-32/` (`paths.ddpm_dir()`), a huggingface_hub `local_dir` snapshot of
  config.json, diffusion_pytorch_model.safetensors, scheduler_config.json and model_index.json;
- cifar10: `<itd home>/data/cifar-10-batches-py/` (`paths.cifar_dir()`); the tarball is deleted once extracted.

With `dir`, each goes straight into that folder instead (`DIR/<checkpoint>.pt`, `DIR/ddpm-cifar10-32/`,
`DIR/cifar-10-batches-py/`). Each folder's `itd-manifest.json` records the sha256 of files that have no
published checksum (the IDDPM checkpoints, the DDPM snapshot) at their first download, and the DDPM commit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from itdcli import outputs, paths
from itdcli.downloads import archive, fetch, hub, manifest
from itdcli.downloads.fetch import Policy, Progress
from itdcli.errors import ItdError

IDDPM_BASE = "https://openaipublic.blob.core.windows.net/diffusion/march-2021"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
DDPM_REPO = "google/ddpm-cifar10-32"
# Pinned revision of DDPM_REPO. TODO: replace "main" by the commit hash (it could not be looked up offline);
# until then every download records the commit "main" resolved to in itd-manifest.json.
DDPM_REVISION = "main"
DDPM_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "model_index.json")
CIFAR_MEMBERS = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
SPACE_MARGIN = 32 * 2**20

Kind = Literal["file", "tarball", "hub"]
Status = Literal["missing", "incomplete", "unverified", "verified", "modified"]
Basis = Literal["published", "recorded", "first-download"]


@dataclass(frozen=True)
class Artifact:
    """One downloadable thing: a plain file, a tarball to extract, or a Hugging Face Hub snapshot."""

    name: str
    kind: Kind
    url: str  # where it comes from (for "hub", the repository's page; the Hub client builds its own URLs)
    filename: str  # name under the base URL (kept by --mirror) and on disk; for "hub", the local folder
    size: int  # bytes: exact if size_exact, else an estimate for the free-space check (Content-Length decides)
    size_exact: bool = False
    md5: str | None = None
    sha256: str | None = None
    folder: str = ""  # tarball: the folder it extracts to
    members: Mapping[str, str] = field(default_factory=dict)  # tarball: md5 of the files in `folder`
    unpacked: int = 0  # tarball: approximate bytes once extracted
    repo: str = ""  # hub: repository id
    revision: str = "main"  # hub: pinned revision
    files: tuple[str, ...] = ()  # hub: the files to fetch
    area: Literal["models", "data"] = "models"  # default home: the itd home's models/ or data/
    description: str = ""


class DownloadRecord(BaseModel):
    """What `download` did for one artifact: where it is, its checksums and how they were verified."""

    name: str
    path: Path
    source: str
    size: int
    md5: str | None = None
    sha256: str | None = None
    commit: str | None = None
    verified: bool  # checked against a published checksum or the one recorded at the first download
    basis: Basis
    skipped: bool  # already present and verified, so nothing was fetched


class ArtifactStatus(BaseModel):
    """What `listing` reports for one artifact."""

    name: str
    description: str
    path: Path
    source: str
    size: int
    size_exact: bool
    present: bool
    status: Status


def _iddpm(name: str, description: str) -> Artifact:
    """An IDDPM checkpoint: no published checksum, about 210 MB (raw parameter bytes, for the space check)."""
    filename = paths.IDDPM_FILES[name]
    url = f"{IDDPM_BASE}/{filename}"
    return Artifact(name, "file", url, filename, size=210_185_752, description=description)


ARTIFACTS: dict[str, Artifact] = {
    "iddpm": _iddpm("iddpm", "IDDPM CIFAR-10 checkpoint, L_vlb (OpenAI improved-diffusion)"),
    "iddpm-hybrid": _iddpm("iddpm-hybrid", "IDDPM CIFAR-10 checkpoint, L_hybrid (OpenAI improved-diffusion)"),
    "ddpm": Artifact(
        "ddpm",
        "hub",
        f"https://huggingface.co/{DDPM_REPO}",
        "ddpm-cifar10-32",
        size=143_000_000,
        repo=DDPM_REPO,
        revision=DDPM_REVISION,
        files=DDPM_FILES,
        description="DDPM CIFAR-10 (Ho et al.), diffusers UNet2DModel from the Hugging Face Hub",
    ),
    "cifar10": Artifact(
        "cifar10",
        "tarball",
        CIFAR_URL,
        "cifar-10-python.tar.gz",
        size=170_498_071,
        size_exact=True,
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        members=CIFAR_MEMBERS,
        unpacked=187_000_000,
        area="data",
        description="CIFAR-10 python pickles (train and test batches)",
    ),
}


@dataclass(frozen=True)
class _Job:
    """One artifact to fetch and the settings of this download."""

    artifact: Artifact
    root: Path
    url: str
    force: bool
    progress: Progress | None
    policy: Policy


def artifacts(names: Sequence[str | Artifact]) -> list[Artifact]:
    """The artifacts for `names` (registry names or Artifact objects), in order, without repeats."""
    chosen: dict[str, Artifact] = {}
    for name in names:
        if isinstance(name, Artifact):
            chosen.setdefault(name.name, name)
        elif name in ARTIFACTS:
            chosen.setdefault(name, ARTIFACTS[name])
        else:
            raise ItdError(f"unknown download '{name}': choose from {', '.join(ARTIFACTS)}")
    return list(chosen.values())


def location(artifact: str | Artifact, dir: Path | None = None) -> Path:
    """Where an artifact lands: its file, its snapshot folder (hub) or its extracted folder (tarball)."""
    a = artifacts([artifact])[0]
    return _root(a, dir) / (a.folder if a.kind == "tarball" else a.filename)


def download(
    names: Sequence[str | Artifact],
    *,
    dir: Path | None = None,
    force: bool = False,
    mirror: str | None = None,
    progress: Progress | None = None,
    retries: int = 4,
    backoff: float = 1.0,
) -> list[DownloadRecord]:
    """Fetch and verify each artifact into place, skipping verified copies unless `force` (see the module doc)."""
    chosen = artifacts(names)
    base = _mirror(mirror)
    policy = Policy(retries=retries, backoff=backoff)
    records = []
    for a in chosen:
        url = f"{base}/{a.filename}" if base and a.kind != "hub" else a.url
        target = outputs.check(location(a, dir), "--dir", example=str(Path.cwd() / "itd-downloads"))
        with outputs.claim(target, "--dir"):
            records.append(_download_one(_Job(a, _root(a, dir), url, force, progress, policy)))
    return records


def listing(dir: Path | None = None, names: Sequence[str | Artifact] | None = None) -> list[ArtifactStatus]:
    """Each artifact (default: all registered) with its size, where it goes, and whether it is present and verified."""
    statuses = []
    for a in artifacts(list(ARTIFACTS) if names is None else names):
        path = location(a, dir)
        status = _state(a, path)
        source = f"{a.repo}@{a.revision}" if a.kind == "hub" else a.url
        statuses.append(
            ArtifactStatus(
                name=a.name,
                description=a.description,
                path=path,
                source=source,
                size=a.size,
                size_exact=a.size_exact,
                present=status != "missing",
                status=status,
            )
        )
    return statuses


def _root(a: Artifact, dir: Path | None) -> Path:
    """The folder an artifact goes into: `dir`, else the itd home's models/ or data/."""
    if dir is not None:
        return Path(dir).expanduser()
    return paths.models_dir() if a.area == "models" else paths.data_dir()


def _mirror(mirror: str | None) -> str | None:
    """The mirror base URL (argument, else ITD_MIRROR) without a trailing slash."""
    base = mirror or os.environ.get("ITD_MIRROR") or None
    if base is not None and not re.match(r"(https?|file)://", base):
        raise ItdError(f"mirror '{base}' is not an http://, https:// or file:// URL")
    return base.rstrip("/") if base else None


def _state(a: Artifact, path: Path) -> Status:
    """Whether the artifact at `path` is present and verified."""
    if a.kind == "hub":
        return _hub_state(a, path)
    if a.kind == "tarball":
        return _tree_state(a, path)
    return _file_state(a, path)


def _download_one(job: _Job) -> DownloadRecord:
    """Dispatch on the artifact's kind; `force` also drops a partial download."""
    if job.force and job.artifact.kind != "hub":
        _part(job.root / job.artifact.filename).unlink(missing_ok=True)
    if job.artifact.kind == "hub":
        return _download_hub(job)
    if job.artifact.kind == "tarball":
        return _download_tarball(job)
    return _download_file(job)


# plain files


def _download_file(job: _Job) -> DownloadRecord:
    """A verified file at its target, fetched unless a verified copy is there already."""
    a, target = job.artifact, job.root / job.artifact.filename
    expected = _expected(a, target)
    if not job.force and expected is not None and target.is_file():
        md5, sha256 = manifest.digests(target)
        if _matches(expected, md5, sha256):
            _part(target).unlink(missing_ok=True)  # a part left by an interrupted --force is of no more use
            return _file_record(job, target, md5, sha256, expected, skipped=True)
    outputs.require_space(target.parent, a.size - _part_size(target), a.name, "--dir", SPACE_MARGIN)
    md5, sha256 = _fetch_verified(job, target, expected)
    return _file_record(job, target, md5, sha256, expected, skipped=False)


def _file_record(
    job: _Job, target: Path, md5: str, sha256: str, expected: tuple[str, str, Basis] | None, skipped: bool
) -> DownloadRecord:
    """The record of a file now at `target`."""
    return DownloadRecord(
        name=job.artifact.name,
        path=target,
        source=job.url,
        size=target.stat().st_size,
        md5=md5,
        sha256=sha256,
        verified=expected is not None,
        basis=expected[2] if expected else "first-download",
        skipped=skipped,
    )


def _expected(a: Artifact, target: Path) -> tuple[str, str, Basis] | None:
    """The checksum a file must have: the published sha256 or md5, else the sha256 recorded at its first download."""
    if a.sha256:
        return "sha256", a.sha256, "published"
    if a.md5:
        return "md5", a.md5, "published"
    entry = manifest.read(target.parent).get(target.name)
    if entry is not None and entry.sha256:
        return "sha256", entry.sha256, "recorded"
    return None


def _file_state(a: Artifact, path: Path) -> Status:
    """missing, unverified (nothing to check against), verified or modified."""
    if not path.is_file():
        return "missing"
    expected = _expected(a, path)
    if expected is None:
        return "unverified"
    return "verified" if _matches(expected, *manifest.digests(path)) else "modified"


def _matches(expected: tuple[str, str, Basis], md5: str, sha256: str) -> bool:
    """Whether a file with these digests has the expected checksum."""
    algo, want, _ = expected
    return (md5 if algo == "md5" else sha256) == want


def _part_size(target: Path) -> int:
    """Bytes already in `<target>.part` from an interrupted download."""
    part = _part(target)
    return part.stat().st_size if part.is_file() else 0


def _part(target: Path) -> Path:
    """The temporary file beside `target` that a download streams into."""
    return target.with_name(target.name + ".part")


def _fetch_verified(job: _Job, target: Path, expected: tuple[str, str, Basis] | None) -> tuple[str, str]:
    """Stream into `<target>.part`, check it, rename it onto `target`; return its md5 and sha256."""
    part = _part(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _stream(job, target, part)
    md5, sha256 = manifest.digests(part)
    if expected is not None and not _matches(expected, md5, sha256):
        _mismatch(job, target, part, expected, md5 if expected[0] == "md5" else sha256)
    os.replace(part, target)
    if expected is None:
        entry = manifest.Entry(sha256=sha256, size=target.stat().st_size, source=job.url)
        manifest.record(target.parent, target.name, entry)
    return md5, sha256


def _stream(job: _Job, target: Path, part: Path) -> None:
    """Fetch the URL into `part`, turning failures into one-line errors that say how to place the file by hand."""
    a = job.artifact
    try:
        fetch.fetch(job.url, part, size=a.size if a.size_exact else None, progress=job.progress, policy=job.policy)
    except fetch.Unreachable as exc:
        then = " and run the same `itd download` again to verify and extract it" if a.kind == "tarball" else ""
        raise ItdError(
            f"could not download {job.url} ({exc}); fetch it by other means and place it at {target}{then}"
        ) from exc
    except fetch.BadSize as exc:
        part.unlink(missing_ok=True)
        raise ItdError(f"{job.url} {exc}; nothing was written to {target}") from exc


def _mismatch(job: _Job, target: Path, part: Path, expected: tuple[str, str, Basis], got: str) -> None:
    """Remove the .part and fail: its checksum is not the expected one."""
    algo, want, basis = expected
    part.unlink(missing_ok=True)
    hint = (
        f" (the {algo} recorded at the first download; delete its entry in {target.parent / manifest.MANIFEST}"
        " to accept a new file)"
        if basis == "recorded"
        else ""
    )
    raise ItdError(
        f"checksum mismatch for {job.url}: expected {algo} {want}{hint}, got {got}; nothing was written to {target}"
    )


# tarballs


def _download_tarball(job: _Job) -> DownloadRecord:
    """The extracted, member-verified folder; the tarball is fetched (unless a verified one is there) then deleted."""
    a = job.artifact
    dest, tarball = job.root / a.folder, job.root / a.filename
    if not job.force and _tree_state(a, dest) == "verified":
        return _tarball_record(job, dest, a.size, skipped=True)
    fetching = job.force or _file_state(a, tarball) != "verified"
    outputs.require_space(
        dest.parent, (a.size - _part_size(tarball) if fetching else 0) + a.unpacked, a.name, "--dir", SPACE_MARGIN
    )
    if fetching:
        _fetch_verified(job, tarball, _expected(a, tarball))
    size = tarball.stat().st_size
    archive.extract(tarball, dest, a.folder, a.members)
    tarball.unlink()
    return _tarball_record(job, dest, size, skipped=False)


def _tarball_record(job: _Job, dest: Path, size: int, skipped: bool) -> DownloadRecord:
    """The record of an extracted tarball (size and checksums are the archive's)."""
    a = job.artifact
    return DownloadRecord(
        name=a.name,
        path=dest,
        source=job.url,
        size=size,
        md5=a.md5,
        sha256=a.sha256,
        verified=True,
        basis="published",
        skipped=skipped,
    )


def _tree_state(a: Artifact, dest: Path) -> Status:
    """missing, incomplete (a member is absent), modified (a member's md5 differs) or verified."""
    if not dest.is_dir():
        return "missing"
    files = [(dest / name, md5) for name, md5 in a.members.items()]
    if not all(path.is_file() for path, _ in files):
        return "incomplete"
    return "verified" if all(manifest.digests(path)[0] == md5 for path, md5 in files) else "modified"


# Hugging Face Hub snapshots


def _download_hub(job: _Job) -> DownloadRecord:
    """The snapshot's files in their folder through huggingface_hub, with their sha256s and commit recorded."""
    a = job.artifact
    dest = job.root / a.filename
    if not job.force and _hub_state(a, dest) == "verified":
        entry = manifest.read(dest.parent)[dest.name]
        return _hub_record(job, dest, entry, basis="recorded", skipped=True)
    outputs.require_space(dest.parent, a.size, a.name, "--dir", SPACE_MARGIN)
    try:
        commit = hub.snapshot(a.repo, a.revision, a.files, dest, job.force)
    except Exception as exc:  # the Hub client's many failure types all become one line
        raise ItdError(_hub_failure(a, dest, exc)) from exc
    missing = [name for name in a.files if not (dest / name).is_file()]
    if missing:
        raise ItdError(f"{a.repo} in {dest} lacks {', '.join(missing)}: {_hub_advice(a, dest)}")
    files = {name: manifest.digests(dest / name)[1] for name in a.files}
    size = sum((dest / name).stat().st_size for name in a.files)
    entry = manifest.Entry(size=size, source=f"{a.repo}@{a.revision}", commit=commit, files=files)
    manifest.record(dest.parent, dest.name, entry)
    return _hub_record(job, dest, entry, basis="first-download", skipped=False)


def _hub_record(job: _Job, dest: Path, entry: manifest.Entry, basis: Basis, skipped: bool) -> DownloadRecord:
    """The record of a snapshot: its weights file's sha256 and the commit."""
    a = job.artifact
    return DownloadRecord(
        name=a.name,
        path=dest,
        source=f"{a.repo}@{a.revision}",
        size=entry.size or 0,
        sha256=entry.files.get(next((f for f in a.files if f.endswith(".safetensors")), a.files[0])),
        commit=entry.commit,
        verified=basis == "recorded",
        basis=basis,
        skipped=skipped,
    )


def _hub_state(a: Artifact, dest: Path) -> Status:
    """missing, incomplete, unverified (no recorded sha256s), verified or modified."""
    present = [name for name in a.files if (dest / name).is_file()]
    if not present:
        return "missing"
    if len(present) < len(a.files):
        return "incomplete"
    entry = manifest.read(dest.parent).get(dest.name)
    if entry is None or set(entry.files) != set(a.files):
        return "unverified"
    same = all(manifest.digests(dest / name)[1] == entry.files[name] for name in a.files)
    return "verified" if same else "modified"


def _hub_failure(a: Artifact, dest: Path, exc: Exception) -> str:
    """One line: what failed, why, and how to get the files another way."""
    lines = str(exc).strip().splitlines()
    reason = "HF_HUB_OFFLINE is set" if hub.offline() else (lines[0] if lines else type(exc).__name__)
    reason = reason.removeprefix("Got: ")
    where = f"{a.repo} (revision {a.revision}) from {hub.endpoint()}"
    return f"could not download {where}: {reason}; {_hub_advice(a, dest)}"


def _hub_advice(a: Artifact, dest: Path) -> str:
    """How to get a snapshot without this command."""
    return f"place {', '.join(a.files)} in {dest} by hand, or set HF_ENDPOINT to a Hub mirror"
