"""Stream one URL into a `.part` file with the standard library: resume with HTTP Range, retry with backoff."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Protocol

from itdcli import __version__

Progress = Callable[[int, int], None]

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")
_FATAL_NETWORK = (ConnectionRefusedError, socket.gaierror, FileNotFoundError)


class Unreachable(Exception):
    """The file cannot be fetched (HTTP error, refused connection, retries used up); the message says why."""


class BadSize(Exception):
    """The server announced or sent another size than the expected one."""


class _Retry(Exception):
    """A transient failure: try again, keeping what was received."""


class _Response(Protocol):
    """What `urlopen` returns for http(s) and file URLs, as far as this module uses it."""

    @property
    def status(self) -> int | None: ...

    @property
    def headers(self) -> Message: ...

    def read(self, amt: int, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Policy:
    """How hard to try: retries after transient failures, the first backoff in seconds (it doubles), the timeout."""

    retries: int = 4
    backoff: float = 1.0
    timeout: float = 30.0


def fetch(url: str, part: Path, *, size: int | None, progress: Progress | None, policy: Policy) -> None:
    """Download `url` into `part`, continuing a partial `part`; on return `part` holds the whole body."""
    failures = 0
    while True:
        try:
            return _attempt(url, part, size, progress, policy.timeout)
        except _Retry as exc:
            failures += 1
            if failures > policy.retries:
                raise Unreachable(f"{exc} ({policy.retries} retries used up)") from exc
            time.sleep(policy.backoff * 2 ** (failures - 1))


def _attempt(url: str, part: Path, size: int | None, progress: Progress | None, timeout: float) -> None:
    """One request: resume from the bytes in `part`, or start over if the server sends the whole file."""
    have = part.stat().st_size if part.exists() else 0
    with contextlib.closing(_open(url, part, have, timeout)) as response:
        start, total = _body_start(response, part, have)
        if size is not None and total is not None and total != size:
            raise BadSize(f"is {total:,} bytes, expected {size:,}")
        done = _copy(response, part, start, total if total is not None else size, progress)
    if total is None and size is not None and done < size:
        raise _Retry(f"connection dropped after {done:,} of {size:,} bytes")
    if total is None and size is not None and done > size:
        raise BadSize(f"sent {done:,} bytes, expected {size:,}")


def _open(url: str, part: Path, have: int, timeout: float) -> _Response:
    """The response to a GET, with `Range: bytes=have-` when resuming; errors sorted into fatal and transient."""
    headers = {"User-Agent": f"itd/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response: _Response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _http_error(exc.code, str(exc.reason), part) from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, _FATAL_NETWORK):
            raise Unreachable(_describe(reason)) from exc
        raise _Retry(_describe(reason)) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(_describe(exc)) from exc
    return response


def _http_error(code: int, reason: str, part: Path) -> Exception:
    """HTTP 5xx, 408 and 429 are worth a retry; 416 means the partial file is unusable; the rest are final."""
    if code == 416:
        part.unlink(missing_ok=True)
        return _Retry("the server refused to resume; starting over")
    message = f"HTTP {code} {reason}".strip()
    return _Retry(message) if code >= 500 or code in (408, 429) else Unreachable(message)


def _body_start(response: _Response, part: Path, have: int) -> tuple[int, int | None]:
    """Where the body goes in `part` (0 after a 200) and the whole file's size (None if the server does not say)."""
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match and int(match[1]) == have:
            return have, None if match[2] == "*" else int(match[2])
        part.unlink(missing_ok=True)
        raise _Retry("the server resumed at another offset; starting over")
    length = response.headers.get("Content-Length", "").strip()
    return 0, int(length) if length.isdigit() else None


def _copy(response: _Response, part: Path, start: int, total: int | None, progress: Progress | None) -> int:
    """Append to `part` (resuming at `start`) or write it from zero; insist on the announced total."""
    done = start
    with part.open("ab" if start else "wb") as out:
        while chunk := _read(response):
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total or 0)
    if total is not None and done < total:
        raise _Retry(f"connection dropped after {done:,} of {total:,} bytes")
    return done


def _read(response: _Response) -> bytes:
    """The next chunk of the body; a broken connection is transient."""
    try:
        return response.read(CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(f"connection lost ({_describe(exc)})") from exc


def _describe(reason: object) -> str:
    """A short reason: an OSError's strerror, else its text, else its class name."""
    if isinstance(reason, OSError) and reason.strerror:
        return str(reason.strerror)
    return str(reason) or type(reason).__name__
