"""The DDPM snapshot through huggingface_hub, which itself reads HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

_COMMIT = re.compile(r"[0-9a-f]{40}")


def snapshot(repo: str, revision: str, files: Sequence[str], dest: Path, force: bool) -> str | None:
    """Download `files` of `repo` at `revision` into the folder `dest`; return the commit hash when known."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo, revision=revision, local_dir=dest, allow_patterns=list(files), force_download=force)
    return resolved_commit(repo, revision)


def resolved_commit(repo: str, revision: str) -> str | None:
    """The commit `revision` pointed to at download time, from huggingface_hub's refs cache; None if unknown."""
    if _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi

    try:
        return HfApi().resolve_revision(repo, revision=revision, local_files_only=True).resolved
    except Exception:  # best effort: the manifest then records the commit as unknown
        return None


def endpoint() -> str:
    """The Hub URL in use (HF_ENDPOINT or huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    """Whether HF_HUB_OFFLINE is on."""
    from huggingface_hub import constants

    return constants.is_offline_mode()
