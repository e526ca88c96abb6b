"""`itdcli.download` against a local HTTP server: resume, restart, checksums, errors, safe extraction, listing."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from itdcli import paths
from itdcli.download import ARTIFACTS, CIFAR_MEMBERS, Artifact, artifacts, download, listing, location
from itdcli.downloads.manifest import MANIFEST
from itdcli.errors import ItdError

BODY = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


@dataclass
class Site:
    """What the test server serves and how it misbehaves; it logs (file, Range header) per request."""

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: int | None = None  # send this many body bytes, then close the connection (once)
    ignore_range: bool = False  # always answer 200 with the whole body
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    base: str = ""

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            site.requests.append((name, self.headers.get("Range")))
            body = site.files.get(name)
            if body is None:
                self.send_error(404, "Not Found")
                return
            start = self._start(len(body))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if site.drop_after is not None:
                cut, site.drop_after = site.drop_after, None
                self.wfile.write(body[start : start + cut])
                self.close_connection = True
                return
            self.wfile.write(body[start:])

        def _start(self, size: int) -> int:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            return int(match[1]) if match and not site.ignore_range and int(match[1]) < size else 0

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    s.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield s
    server.shutdown()
    server.server_close()


def blob(site: Site, body: bytes = BODY, **fields: object) -> Artifact:
    """A plain-file artifact served by `site` (exact size, no checksum unless given)."""
    site.files["blob.bin"] = body
    return Artifact("blob", "file", site.url("blob.bin"), "blob.bin", len(body), size_exact=True, **fields)  # type: ignore[arg-type]


def leftovers(folder: Path) -> list[str]:
    """Names in `folder` other than the manifest."""
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST) if folder.exists() else []


def one_line_error(exc: pytest.ExceptionInfo[ItdError], *words: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_resumes_with_range_after_a_dropped_connection(site: Site, tmp_path: Path) -> None:
    art = blob(site, sha256=hashlib.sha256(BODY).hexdigest())
    site.drop_after = 100_000
    seen: list[tuple[int, int]] = []
    [record] = download([art], dir=tmp_path, backoff=0, progress=lambda d, t: seen.append((d, t)))
    assert (tmp_path / "blob.bin").read_bytes() == BODY
    assert site.requests == [("blob.bin", None), ("blob.bin", "bytes=100000-")]
    assert record.verified and record.basis == "published" and not record.skipped
    assert record.sha256 == hashlib.sha256(BODY).hexdigest() and record.size == len(BODY)
    assert seen[-1] == (len(BODY), len(BODY)) and leftovers(tmp_path) == ["blob.bin"]


def test_resumes_a_part_left_by_an_interrupted_run(site: Site, tmp_path: Path) -> None:
    art = blob(site, md5=hashlib.md5(BODY).hexdigest())
    (tmp_path / "blob.bin.part").write_bytes(BODY[:1234])
    download([art], dir=tmp_path, backoff=0)
    assert site.requests == [("blob.bin", "bytes=1234-")]
    assert (tmp_path / "blob.bin").read_bytes() == BODY and leftovers(tmp_path) == ["blob.bin"]


def test_restarts_from_zero_when_the_server_ignores_range(site: Site, tmp_path: Path) -> None:
    art = blob(site, sha256=hashlib.sha256(BODY).hexdigest())
    site.drop_after, site.ignore_range = 100_000, True
    download([art], dir=tmp_path, backoff=0)
    assert site.requests == [("blob.bin", None), ("blob.bin", "bytes=100000-")]
    assert (tmp_path / "blob.bin").read_bytes() == BODY


def test_gives_up_after_the_retries(site: Site, tmp_path: Path) -> None:
    art = blob(site)
    site.drop_after = 10
    site.ignore_range = True
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path, backoff=0, retries=0)
    one_line_error(exc, art.url, "connection dropped", str(tmp_path / "blob.bin"))
    assert not (tmp_path / "blob.bin").exists()


def test_checksum_mismatch_leaves_nothing(site: Site, tmp_path: Path) -> None:
    art = blob(site, sha256="0" * 64)
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path, backoff=0)
    one_line_error(exc, "checksum mismatch", art.url, str(tmp_path / "blob.bin"))
    assert leftovers(tmp_path) == []


def test_wrong_announced_size_leaves_nothing(site: Site, tmp_path: Path) -> None:
    art = dataclasses.replace(blob(site), size=len(BODY) + 1)
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path, backoff=0)
    one_line_error(exc, f"{len(BODY):,} bytes", "nothing was written")
    assert leftovers(tmp_path) == []


def test_404_names_the_url_and_where_to_put_the_file(site: Site, tmp_path: Path) -> None:
    art = Artifact("gone", "file", site.url("gone.pt"), "gone.pt", 10)
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path)
    one_line_error(exc, art.url, "HTTP 404", f"place it at {tmp_path / 'gone.pt'}")
    assert leftovers(tmp_path) == []


def test_unreachable_host_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    art = Artifact("off", "file", f"http://127.0.0.1:{port}/off.pt", "off.pt", 10)
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path)
    one_line_error(exc, art.url, "refused", f"place it at {tmp_path / 'off.pt'}")
    assert leftovers(tmp_path) == []


def test_first_download_records_sha256_and_listing_tracks_it(site: Site, tmp_path: Path) -> None:
    art = blob(site)
    assert [s.status for s in listing(tmp_path, [art])] == ["missing"]
    [record] = download([art], dir=tmp_path)
    assert record.basis == "first-download" and not record.verified
    entry = json.loads((tmp_path / MANIFEST).read_text())["blob.bin"]
    assert entry["sha256"] == hashlib.sha256(BODY).hexdigest() and entry["source"] == art.url
    [status] = listing(tmp_path, [art])
    assert status.status == "verified" and status.present and status.path == tmp_path / "blob.bin"
    (tmp_path / "blob.bin").write_bytes(BODY[:-1] + b"x")
    assert listing(tmp_path, [art])[0].status == "modified"
    (tmp_path / MANIFEST).unlink()
    assert listing(tmp_path, [art])[0].status == "unverified"


def test_verified_files_are_skipped_unless_force(site: Site, tmp_path: Path) -> None:
    art = blob(site)
    download([art], dir=tmp_path)
    [again] = download([art], dir=tmp_path)
    assert again.skipped and again.verified and again.basis == "recorded" and len(site.requests) == 1
    [forced] = download([art], dir=tmp_path, force=True)
    assert not forced.skipped and forced.verified and len(site.requests) == 2


def test_a_changed_upstream_file_is_refused_against_the_record(site: Site, tmp_path: Path) -> None:
    art = blob(site)
    download([art], dir=tmp_path)
    site.files["blob.bin"] = BODY[::-1]
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path, force=True)
    one_line_error(exc, "checksum mismatch", "recorded at the first download", MANIFEST)
    assert (tmp_path / "blob.bin").read_bytes() == BODY and leftovers(tmp_path) == ["blob.bin"]


def test_free_space_is_checked_first(site: Site, tmp_path: Path) -> None:
    art = dataclasses.replace(blob(site), size=10**18)
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path)
    one_line_error(exc, "not enough free space", "blob")
    assert site.requests == []


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ItdError) as exc:
        download(["iddpm", "sd-xl"])
    one_line_error(exc, "sd-xl", "iddpm, iddpm-hybrid, ddpm, cifar10")


def test_bad_mirror_is_refused() -> None:
    with pytest.raises(ItdError, match="not an http"):
        download(["iddpm"], mirror="ftp.example.org/x")


def test_default_locations_are_those_of_itdcli_paths(tmp_path: Path) -> None:
    assert location("iddpm") == paths.iddpm_checkpoint("iddpm")
    assert location("iddpm-hybrid") == paths.iddpm_checkpoint("iddpm-hybrid")
    assert location("ddpm") == paths.ddpm_dir()
    assert location("cifar10") == paths.cifar_dir()
    assert location("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert [a.name for a in artifacts(["cifar10", "iddpm", "cifar10"])] == ["cifar10", "iddpm"]
    assert {s.name: s.status for s in listing()} == dict.fromkeys(ARTIFACTS, "missing")


def test_mirror_keeps_the_file_names(site: Site, tmp_path: Path) -> None:
    name = paths.IDDPM_FILES["iddpm-hybrid"]
    site.files[name] = BODY
    [record] = download(["iddpm-hybrid"], mirror=site.base + "/", backoff=0)
    assert record.path == paths.iddpm_checkpoint("iddpm-hybrid") and record.source == site.url(name)
    assert record.path.read_bytes() == BODY


# CIFAR-10 tarballs


def fake_cifar(members: dict[str, bytes] | None = None) -> tuple[bytes, dict[str, str]]:
    """A small cifar-10-python.tar.gz: the seven pickles (protocol 2, random content) and a readme; their md5s."""
    rng = np.random.default_rng(1)
    files = {}
    for name in CIFAR_MEMBERS:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        files[name] = pickle.dumps(batch, protocol=2)
    files["readme.html"] = b"<html>fake</html>"
    md5s = {name: hashlib.md5(data).hexdigest() for name, data in files.items() if name != "readme.html"}
    entries = {f"cifar-10-batches-py/{name}": data for name, data in files.items()} | (members or {})
    return _targz(entries), md5s


def _targz(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def cifar(site: Site, tarball: bytes, md5s: dict[str, str]) -> Artifact:
    """The registry's cifar10 entry pointed at `site`, with the fake's size and checksums."""
    site.files["cifar-10-python.tar.gz"] = tarball
    return dataclasses.replace(
        ARTIFACTS["cifar10"],
        url=site.url("cifar-10-python.tar.gz"),
        size=len(tarball),
        md5=hashlib.md5(tarball).hexdigest(),
        members=md5s,
    )


def test_fake_cifar_extracts_and_verifies(site: Site, tmp_path: Path) -> None:
    art = cifar(site, *fake_cifar())
    [record] = download([art], dir=tmp_path, backoff=0)
    folder = tmp_path / "cifar-10-batches-py"
    assert record.path == folder and record.verified and record.md5 == art.md5
    assert sorted(p.name for p in folder.iterdir()) == sorted([*CIFAR_MEMBERS, "readme.html"])
    assert pickle.loads((folder / "data_batch_1").read_bytes())["data"].shape == (4, 3072)
    assert leftovers(tmp_path) == ["cifar-10-batches-py"]  # tarball deleted, no temporary folders
    assert listing(tmp_path, [art])[0].status == "verified"
    assert download([art], dir=tmp_path)[0].skipped and len(site.requests) == 1
    (folder / "test_batch").write_bytes(b"changed")
    assert listing(tmp_path, [art])[0].status == "modified"
    (folder / "test_batch").unlink()
    assert listing(tmp_path, [art])[0].status == "incomplete"
    assert not download([art], dir=tmp_path)[0].skipped and listing(tmp_path, [art])[0].status == "verified"


def test_default_cifar_location(site: Site) -> None:
    art = cifar(site, *fake_cifar())
    download([art])
    assert (paths.cifar_dir() / "batches.meta").is_file() and leftovers(paths.data_dir()) == ["cifar-10-batches-py"]


def test_wrong_member_md5_extracts_nothing(site: Site, tmp_path: Path) -> None:
    tarball, md5s = fake_cifar()
    art = cifar(site, tarball, md5s | {"data_batch_3": "0" * 32})
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path)
    one_line_error(exc, "data_batch_3", "nothing was extracted")
    assert leftovers(tmp_path) == ["cifar-10-python.tar.gz"]  # the verified archive stays for a retry


def test_a_member_escaping_the_folder_is_refused(site: Site, tmp_path: Path) -> None:
    art = cifar(site, *fake_cifar({"../evil": b"gotcha"}))
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path / "dl")
    one_line_error(exc, "../evil", "outside", "nothing was extracted")
    assert not (tmp_path / "evil").exists() and leftovers(tmp_path / "dl") == ["cifar-10-python.tar.gz"]


def test_links_in_the_archive_are_refused(site: Site, tmp_path: Path) -> None:
    tarball, md5s = fake_cifar()
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        entries = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("cifar-10-batches-py/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    art = cifar(site, out.getvalue(), md5s)
    with pytest.raises(ItdError) as exc:
        download([art], dir=tmp_path)
    one_line_error(exc, "passwd", "is a link")
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_a_tarball_placed_by_hand_is_verified_and_extracted(tmp_path: Path) -> None:
    tarball, md5s = fake_cifar()
    art = dataclasses.replace(
        ARTIFACTS["cifar10"], url="http://127.0.0.1:9/unused", size=len(tarball), md5=hashlib.md5(tarball).hexdigest()
    )
    art = dataclasses.replace(art, members=md5s)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(tarball)
    [record] = download([art], dir=tmp_path)
    assert not record.skipped and (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()


# DDPM through the real huggingface_hub code path, offline


def test_ddpm_offline_without_a_cache_is_one_clear_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "ITD_HOME": str(tmp_path / "home")}
    script = (
        "from itdcli.download import download\nfrom itdcli.errors import ItdError\n"
        "try:\n    download(['ddpm'])\nexcept ItdError as exc:\n    print(exc)\n    raise SystemExit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and "google/ddpm-cifar10-32" in line and "HF_HUB_OFFLINE" in line, line
    assert str(tmp_path / "home" / "models" / "ddpm-cifar10-32") in line and "config.json" in line
    assert not (tmp_path / "home" / "models" / MANIFEST).exists()
