"""Image data for medchain: containers, sources (simulated CT, MedMNIST, local files) and the
split of a data set among institutions.

>>> from medchain.data import load_dataset, partition
>>> ds = load_dataset("breastmnist")                      # doctest: +SKIP
>>> institutions = partition(ds, 5, "dirichlet", alpha=0.5, seed=0)   # doctest: +SKIP
>>> data_provenance(ds)["sha256"]                           # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

from .partition import SCHEMES, partition, partition_indices, partition_plan
from .provenance import content_sha256, data_provenance
from .sources import (MEDMNIST_FLAGS, MEDMNIST_INFO, default_cache_dir, describe, load_dataset,
                      save_npz)
from .types import Dataset, ImageSet, InstitutionData

__all__ = [
    "Dataset",
    "ImageSet",
    "InstitutionData",
    "MEDMNIST_FLAGS",
    "MEDMNIST_INFO",
    "SCHEMES",
    "content_sha256",
    "data_provenance",
    "default_cache_dir",
    "describe",
    "load_dataset",
    "partition",
    "partition_indices",
    "partition_plan",
    "save_npz",
    "simulate_ct",
]


def __getattr__(name: str) -> Any:
    # simulate_ct is imported on first use, so that importing medchain.data stays light and
    # works even where the simulator module is absent.
    if name == "simulate_ct":
        from .simulate import simulate_ct
        return simulate_ct
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
