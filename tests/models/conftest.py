"""Fixtures for the models tests: an isolated torch.hub folder, so no test reads or fills the user's cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point TORCH_HOME at an empty folder: ImageNet weights must come from the weights packages."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)
