"""Shared fixtures: every test gets its own itd home so runs and caches never leak between tests."""

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def itd_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("itd-home")
    monkeypatch.setenv("ITD_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny networks: one intra-op thread avoids oversubscription when other test runs share the CPUs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
