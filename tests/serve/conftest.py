"""Fixtures of the service tests: the bundled model (with its fitted input gate) and a photo that is no X-ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumolab.inference.pytorch import TrainedModel, load_trained


@pytest.fixture(scope="session")
def bundled() -> TrainedModel:
    """The model shipped in the package, on the CPU: the real gate, referral band and TTA views."""
    return load_trained(None, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def photo_png() -> bytes:
    """scikit-image's cat photo (chelsea.png) as PNG bytes: plainly not a chest X-ray."""
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    return (Path(data.__file__).parent / "chelsea.png").read_bytes()
