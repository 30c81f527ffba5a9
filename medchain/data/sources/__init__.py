"""Where image data come from: one entry point, :func:`load_dataset`.

Sources (the ``source`` string):

``"simulated"`` / ``"simulated:n=2000,sites=5,seed=0"``
    medchain's own simulated chest-CT nodule data set (:func:`medchain.data.simulate.simulate_ct`);
    ``k=v`` options are passed to it (numbers as numbers; tuples as ``split=0.7/0.1/0.2``;
    ``class_probs=0.4/0.3/0.3`` is one label mix used at every site).
``"pneumoniamnist"`` / ``"medmnist:pneumoniamnist"``
    a MedMNIST v2/v3 2D set at 28×28 (:data:`MEDMNIST_FLAGS`): read from the data cache
    (:func:`default_cache_dir`), else from the medmnist package's own cache (``~/.medmnist``),
    else downloaded once (with ``pooch``: MD5-verified, progress bar, retries) from its official
    Zenodo record into the data cache.
a path to a ``.npz`` file
    the MedMNIST layout: ``train_images, train_labels, val_images, val_labels, test_images,
    test_labels`` and optional ``train_site, val_site, test_site`` (written by :func:`save_npz`).
a path to a folder of images
    one sub-folder per class (PNG/JPEG), optionally below ``train/ val/ test/`` folders.

Every source is validated strictly; a problem raises :class:`ValueError` (or
:class:`FileNotFoundError` / :class:`ConnectionError` / :class:`RuntimeError`) whose message names
the file and says how to fix it.

Each source is a module that registers its loader by name (:mod:`.registry`, as
:mod:`medchain.models` does for models): :mod:`.simulated`, :mod:`.medmnist`, :mod:`.npz` (which
also holds :func:`save_npz`) and :mod:`.folder`; :mod:`.layout` holds the array validation the file
sources share and :mod:`.summary` :func:`describe`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..limits import MIN_IMAGE_SIDE
from ..types import Dataset
from . import folder, simulated  # noqa: F401  (importing a source module registers it)
from .layout import SPLITS
from .medmnist import (MEDMNIST_3D, MEDMNIST_FLAGS, MEDMNIST_INFO, default_cache_dir,
                       medmnist_package_dir, medmnist_path)
from .npz import save_npz
from .registry import SOURCES, list_sources, register_source
from .summary import describe

__all__ = [
    "MEDMNIST_FLAGS",
    "MEDMNIST_INFO",
    "SPLITS",
    "default_cache_dir",
    "describe",
    "list_sources",
    "load_dataset",
    "medmnist_package_dir",
    "medmnist_path",
    "register_source",
    "save_npz",
]


def load_dataset(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 download: bool = True, image_size: int = 28) -> Dataset:
    """Load a data set with train / val / test splits.

    Parameters
    ----------
    source:
        ``"simulated[:k=v,...]"``, a MedMNIST flag (``"breastmnist"``, ``"medmnist:breastmnist"``),
        a path to a ``.npz`` file in the MedMNIST layout, or a path to a folder of images with
        one sub-folder per class. See the module docstring. A bare flag names the MedMNIST set
        unless a file or folder of that name exists.
    cache_dir:
        Folder for MedMNIST downloads; default :func:`default_cache_dir` (``$MEDCHAIN_DATA``,
        else ``<repo>/data``). A file missing there is then looked for in the medmnist
        package's ``~/.medmnist`` (:func:`medmnist_package_dir`) before any download.
    download:
        If False, a MedMNIST file found in neither folder raises FileNotFoundError instead of
        being downloaded (with pooch: MD5, progress bar, :data:`DOWNLOAD_RETRIES` retries).
    image_size:
        Side length in pixels. Image folders are resized to ``image_size × image_size``; the
        simulated set is generated at that size (unless ``size=`` is given in the source);
        MedMNIST files exist here at 28 only; a local ``.npz`` keeps the size it stores.

    Returns
    -------
    Dataset with uint8 images ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (colour) and int64 labels.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
            or image_size < MIN_IMAGE_SIDE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIDE} (the smallest images "
                         f"medchain's models accept), got {image_size!r}")
    kind, spec = _resolve(source)
    return SOURCES[kind](spec, cache_dir=cache_dir, download=download, image_size=int(image_size))


def _resolve(source: str | os.PathLike) -> tuple[str, str]:
    """(registered source name, the spec its loader reads) for a ``source`` string or path."""
    text = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"source must be a non-empty string or path, got {source!r}")
    text = text.strip()
    low = text.lower()

    if low == "simulated" or low.startswith("simulated:"):
        return "simulated", text

    path = Path(text).expanduser()
    flag = low[len("medmnist:"):] if low.startswith("medmnist:") else None
    if flag is None and not path.exists() and low in MEDMNIST_INFO.keys() | set(MEDMNIST_3D):
        flag = low
    if flag is not None:
        return "medmnist", flag.strip()

    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        return "npz", str(path)
    if path.suffix.lower() == ".npz" or os.sep in text or "/" in text:
        raise FileNotFoundError(f"data file or folder not found: {path}")
    raise ValueError(
        f"unknown data source {text!r}: expected 'simulated' (or 'simulated:n=2000,sites=5,"
        f"seed=0'), a MedMNIST flag ({', '.join(MEDMNIST_FLAGS)}), a path to a .npz file in the "
        "MedMNIST layout, or a path to a folder with one sub-folder of images per class")
