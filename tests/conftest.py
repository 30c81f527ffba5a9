"""Shared fixtures. Real MedMNIST files live in ../shared/data/medmnist beside the repository
(present on the project's machines and in CI, absent on a user's fresh clone)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medchain.chain.anvil import AnvilNotFound, find_anvil
from medchain.data.types import ImageSet
from medchain.training import torch_threads

try:
    find_anvil()
    ANVIL_MISSING = None
except AnvilNotFound as exc:           # CI installs it with `npm ci` in contracts/
    ANVIL_MISSING = str(exc)

#: Tests that run a real anvil node skip cleanly, with the reason, where the binary is absent.
needs_anvil = pytest.mark.skipif(ANVIL_MISSING is not None, reason=f"anvil not installed: {ANVIL_MISSING}")

# tests train from scratch unless they point the run cache somewhere (tests/test_runcache.py)
os.environ.setdefault("MEDCHAIN_RUN_CACHE", "off")

SHARED_MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


@pytest.fixture
def breastmnist_path() -> Path:
    path = SHARED_MEDMNIST / "breastmnist.npz"
    if not path.exists():
        pytest.skip(f"real BreastMNIST not found at {path} (only on the project's machines)")
    return path


def toy_images(n: int, seed: int = 0, size: int = 28) -> ImageSet:
    """A learnable 2-class toy set: class 1 has a bright square in the upper-left quadrant."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.int64)
    images = rng.integers(0, 100, (n, size, size)).astype(np.uint8)
    images[labels == 1, 4:12, 4:12] += 120
    return ImageSet(images, labels)


@pytest.fixture
def one_thread():
    """Run a test with one torch thread, as nodes and notebooks do (trained weights depend on
    the thread count)."""
    with torch_threads(1):
        yield
