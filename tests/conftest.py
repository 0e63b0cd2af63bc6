"""Shared fixtures: the real dataset beside the repo, and small generated datasets in the Kaggle layout."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# two xdist workers share the cores: one compute thread each (set before torch loads), or their pools fight over them
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest_xray").resolve()

# Debian's chromium (Playwright cannot download its own browsers on these machines), headless and offline
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

# Kermany-style names: (class folder, file name)
KERMANY_NAMES = {
    "NORMAL": ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "IM-0002-0001.jpeg", "NORMAL2-IM-0003-0001.jpeg"],
    "PNEUMONIA": [
        "person1_bacteria_1.jpeg",
        "person1_bacteria_2.jpeg",
        "person2_virus_3.jpeg",
        "person3_bacteria_4.jpeg",
    ],
}


@pytest.fixture(scope="module")
def browser():
    """Playwright driving Debian's chromium headless; skipped when either is absent."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (Python) is not installed")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full dataset in ../shared (CI has it beside the clone)."""
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"the shared dataset is not at {SHARED_DATA}")
    return SHARED_DATA


def synthetic_xray(rng: np.random.Generator, size: tuple[int, int] = (64, 64), label: int = 0) -> np.ndarray:
    """A uint8 grayscale image with a lung-like pair of dark ellipses; PNEUMONIA (1) gets bright blotches."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    image = 170 + 30 * rng.standard_normal((h, w))
    for cx in (0.3, 0.7):
        lung = ((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        image[lung] -= 90
    if label:
        for _ in range(3):
            cy, cx = rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.8)
            image[((xx - cx) ** 2 + (yy - cy) ** 2) < 0.005] += 80
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Build a small dataset: ``make_dataset(splits=("train", "test"), per_class=None, size=(64, 64))``.

    Each split gets the `KERMANY_NAMES` files (or `per_class` generated names per class) as real JPEGs.
    """

    def build(
        splits: tuple[str, ...] = ("train", "test"),
        per_class: int | None = None,
        size: tuple[int, int] = (64, 64),
        root: Path | None = None,
        seed: int = 0,
    ) -> Path:
        root = root or tmp_path / "chest_xray"
        rng = np.random.default_rng(seed)
        for split in splits:
            for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                if per_class is None:
                    names = KERMANY_NAMES[cls]
                elif cls == "NORMAL":
                    names = [f"IM-{i // 2:04d}-{i % 2 + 1:04d}.jpeg" for i in range(per_class)]
                else:
                    kinds = ("bacteria", "virus")
                    names = [f"person{i // 2}_{kinds[i % 2]}_{i}.jpeg" for i in range(per_class)]
                for name in names:
                    Image.fromarray(synthetic_xray(rng, size, label)).save(folder / name, quality=90)
        return root

    return build
