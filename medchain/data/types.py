"""Plain containers for image data shared by every part of medchain.

Images are kept as uint8 arrays exactly as stored (MedMNIST layout): shape (N, H, W) for
grey-scale or (N, H, W, C) for colour. Labels are int64 of shape (N,). Conversion to float
tensors happens only in :mod:`medchain.training`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    """One split of images.

    images: uint8 (N, H, W) or (N, H, W, C). labels: int64 (N,), values in [0, n_classes).
    site: optional int64 (N,) acquisition site (scanner) of each image, or None.
    """

    images: np.ndarray
    labels: np.ndarray
    site: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[-1])

    def subset(self, idx: np.ndarray) -> "ImageSet":
        """Rows `idx` (int index array) as a new ImageSet (copies)."""
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx],
                        None if self.site is None else self.site[idx])

    @staticmethod
    def concat(sets: "list[ImageSet]") -> "ImageSet":
        """Pool several sets (e.g. all institutions' data for the centralized baseline)."""
        site = None if any(s.site is None for s in sets) else np.concatenate([s.site for s in sets])
        return ImageSet(np.concatenate([s.images for s in sets]),
                        np.concatenate([s.labels for s in sets]), site)


@dataclass
class Dataset:
    """A dataset with train / val / test splits and its metadata."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    n_classes: int
    class_names: list[str] = field(default_factory=list)
    source: str = ""          # where it came from: "simulated:seed=0", a path, "medmnist:breastmnist"
    #: how the loader obtained it (kind, file, sha256, generator parameters ...), set by
    #: :func:`medchain.data.load_dataset` and :func:`medchain.data.simulate_ct`; read it with
    #: :func:`medchain.data.data_provenance`. Empty for a data set built in memory.
    origin: dict = field(default_factory=dict)

    @property
    def n_channels(self) -> int:
        return self.train.n_channels

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


@dataclass
class InstitutionData:
    """One institution's private data: its own train / val / test splits."""

    index: int
    train: ImageSet
    val: ImageSet
    test: ImageSet
