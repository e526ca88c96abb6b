"""Shared fixtures: every test gets its own itd home so runs and caches never leak between tests."""

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def itd_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("itd-home")
    monkeypatch.setenv("ITD_HOME", str(home))
    return home
