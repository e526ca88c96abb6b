"""`itd download` through typer against a local file server: --list, --mirror/ITD_MIRROR, --dir, one-line errors."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from itdcli import paths
from itdcli.cli.download import download_command
from itdcli.errors import ItdError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(download_command)
VLB, HYBRID = paths.IDDPM_FILES["iddpm"], paths.IDDPM_FILES["iddpm-hybrid"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static file server on 127.0.0.1 serving a fresh folder; yields its URL and the folder."""
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", root
    server.shutdown()
    server.server_close()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def error_line(result: Result, *words: str) -> str:
    """The ItdError the command raised (main.py prints it as one line and exits 2), checked for `words`."""
    assert isinstance(result.exception, ItdError), result.output
    message = str(result.exception)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_list_shows_every_download_missing_on_a_fresh_home() -> None:
    result = invoke("--list")
    assert result.exit_code == 0, result.output
    for word in ("iddpm", "iddpm-hybrid", "ddpm", "cifar10", "missing", "170.5 MB"):
        assert word in result.stdout
    listed = json.loads(invoke("--list", "--json").stdout)
    assert [s["name"] for s in listed] == ["iddpm", "iddpm-hybrid", "ddpm", "cifar10"]
    assert listed[2]["path"] == str(paths.ddpm_dir()) and listed[3]["path"] == str(paths.cifar_dir())
    assert not any(s["present"] for s in listed)


def test_download_through_a_mirror_then_list_and_skip(mirror: tuple[str, Path]) -> None:
    url, root = mirror
    (root / VLB).write_bytes(b"fake checkpoint" * 1000)
    result = invoke("iddpm", "--mirror", url, "--json")
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)
    assert record["path"] == str(paths.iddpm_checkpoint("iddpm")) and record["basis"] == "first-download"
    assert paths.iddpm_checkpoint("iddpm").read_bytes() == (root / VLB).read_bytes()
    table = invoke("iddpm", "--mirror", url)
    assert table.exit_code == 0 and "already there" in table.stdout
    [status] = json.loads(invoke("--list", "--json", "iddpm").stdout)
    assert status["status"] == "verified"
    assert "verified" in invoke("--list").stdout


def test_itd_mirror_env_and_dir(mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, root = mirror
    (root / HYBRID).write_bytes(b"hybrid" * 100)
    out = tmp_path / "elsewhere"
    result = invoke("iddpm-hybrid", "--dir", str(out), env={"ITD_MIRROR": url})
    assert result.exit_code == 0, result.output
    assert (out / HYBRID).read_bytes() == (root / HYBRID).read_bytes()
    assert not paths.iddpm_checkpoint("iddpm-hybrid").exists()
    again = invoke("iddpm-hybrid", "--dir", str(out), "--force", "--json", env={"ITD_MIRROR": url})
    assert json.loads(again.stdout)[0]["skipped"] is False


def test_missing_file_on_the_mirror_is_one_line(mirror: tuple[str, Path]) -> None:
    url, _ = mirror
    result = invoke("iddpm-hybrid", "--mirror", url)
    error_line(result, f"{url}{HYBRID}", "HTTP 404", f"place it at {paths.iddpm_checkpoint('iddpm-hybrid')}")
    assert not paths.models_dir().exists() or not any(paths.models_dir().iterdir())


def test_cifar_with_the_wrong_checksum_leaves_nothing(mirror: tuple[str, Path]) -> None:
    url, root = mirror
    (root / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    result = invoke("cifar10", "--mirror", url)
    error_line(result, "170,498,071", "nothing was written")
    assert not paths.data_dir().exists() or not any(paths.data_dir().iterdir())


def test_bad_arguments_are_one_line() -> None:
    error_line(invoke(), "nothing to download", "--list")
    error_line(invoke("iddpm", "moon"), "moon", "iddpm, iddpm-hybrid, ddpm, cifar10")
    error_line(invoke("iddpm", "--mirror", "example.org"), "example.org")
