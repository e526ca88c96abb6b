"""`itd download NAME... | --list`: fetch pretrained checkpoints and CIFAR-10, or show what is there."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from itdcli.cli import _options as o
from itdcli.cli._render import console, lazy_progress
from itdcli.errors import ItdError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from itdcli.download import ArtifactStatus, DownloadRecord

NAMES = "iddpm, iddpm-hybrid, ddpm, cifar10"
_STYLE = {"verified": "green", "unverified": "yellow", "modified": "red", "incomplete": "red", "missing": "dim"}
_BASIS = {
    "published": "matches the published one",
    "recorded": "matches the first download's",
    "first-download": "recorded (none published)",
}


def download_command(
    names: Annotated[
        list[str] | None, typer.Argument(metavar="NAME", help=f"What to download: {NAMES}.", show_default=False)
    ] = None,
    folder: Annotated[
        Path | None,
        typer.Option("--dir", help="Put everything in this folder (default: the itd home's models/ and data/)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if a verified copy is there.")] = False,
    mirror: Annotated[
        str | None,
        typer.Option(
            envvar="ITD_MIRROR",
            help="Base URL serving the same file names (IDDPM checkpoints, CIFAR-10); ddpm follows HF_ENDPOINT.",
        ),
    ] = None,
    show_list: Annotated[
        bool, typer.Option("--list", help="Show each download: size, where it goes, present and verified or not.")
    ] = False,
    json_out: o.JsonOpt = False,
) -> None:
    """Download the pretrained models and CIFAR-10, checksum-verified, into the itd home (or --dir)."""
    from itdcli.download import listing

    if show_list:
        statuses = listing(folder, names or None)
        if json_out:
            echo_json(statuses)
        else:
            print_listing(statuses)
        return
    if not names:
        raise ItdError(f"nothing to download: name one or more of {NAMES}, or pass --list")
    records = fetch_all(names, folder, force, mirror)
    if json_out:
        echo_json(records)
    else:
        print_downloads(records)


def fetch_all(names: Sequence[str], folder: Path | None, force: bool, mirror: str | None) -> list[DownloadRecord]:
    """Download each artifact under its own progress bar (names are all checked first)."""
    from itdcli.download import artifacts, download

    records: list[DownloadRecord] = []
    for artifact in artifacts(names):
        with bytes_bar(artifact.name) as advance:
            records += download([artifact], dir=folder, force=force, mirror=mirror, progress=advance)
    return records


def echo_json(items: Sequence[BaseModel]) -> None:
    """A JSON list on stdout, for machines."""
    typer.echo(json.dumps([item.model_dump(mode="json") for item in items], indent=2))


def bytes_bar(label: str) -> contextlib.AbstractContextManager[Callable[[int, int], None]]:
    """A transient rich bar on stderr in bytes with speed and ETA; update(done, total), total 0 if unknown."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return lazy_progress(label, columns, rate=False)


def print_listing(statuses: list[ArtifactStatus]) -> None:
    """The table of downloads: name, size, status, where it goes."""
    table = Table(title="itd downloads", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("where", overflow="fold")
    for s in statuses:
        size = decimal(s.size) if s.size_exact else f"≈{decimal(s.size)}"
        status = f"[{_STYLE[s.status]}]{s.status}[/]"
        table.add_row(s.name, size, status, str(s.path))
    console.print(table)


def print_downloads(records: list[DownloadRecord]) -> None:
    """The table of what was downloaded or found, with how it was verified."""
    table = Table(title="itd download", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("checksum")
    table.add_column("where", overflow="fold")
    for r in records:
        result = "already there" if r.skipped else "downloaded"
        table.add_row(r.name, result, decimal(r.size), _BASIS[r.basis], str(r.path))
    console.print(table)
