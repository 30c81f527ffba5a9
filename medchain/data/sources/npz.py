"""A local ``.npz`` file in the MedMNIST layout as a source, and :func:`save_npz`, which writes
a data set in that layout (``train_images, train_labels, ...`` plus optional ``*_site``,
``n_classes``, ``class_names``, ``name``)."""
from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path

import numpy as np

from ..types import Dataset, ImageSet
from .layout import SPLITS, dataset_from_arrays, file_digests, read_npz
from .medmnist import MEDMNIST_FLAGS, MEDMNIST_INFO
from .registry import register_source

__all__ = ["load_npz_file", "save_npz"]


@register_source("npz")
def load_npz_file(spec: str | os.PathLike, **_) -> Dataset:
    """The data set stored in the ``.npz`` file at ``spec``."""
    path = Path(spec)
    arrays = read_npz(path)
    name = path.stem
    if "name" in arrays and arrays["name"].ndim == 0 and arrays["name"].dtype.kind == "U":
        name = str(arrays["name"])
    # A local copy named like a MedMNIST set (breastmnist.npz) gets the official class names
    # when the file carries none and its labels fit.
    official = MEDMNIST_INFO.get(path.stem.lower()) if path.stem.lower() in MEDMNIST_FLAGS \
        else None
    ds = dataset_from_arrays(arrays, where=str(path), name=name, source=str(path.resolve()),
                              official=official, strict=False)
    md5, sha256 = file_digests(path)
    ds.origin = {"kind": "npz", "file": str(path.resolve()), "sha256": sha256, "md5": md5}
    if official is not None:  # named like a MedMNIST set: say whether it is the official file
        ds.origin["official_md5"] = md5 == official["md5"]
    return ds



def save_npz(dataset: Dataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` as a compressed .npz in the MedMNIST layout (plus ``*_site`` arrays when
    every split has them, and ``n_classes``, ``class_names``, ``name``), atomically. A missing
    ``.npz`` suffix is added. Returns the path written; :func:`load_dataset` reads it back exactly.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".npz":
        path = path.with_name(path.name + ".npz")
    has_site = [getattr(dataset, s).site is not None for s in SPLITS]
    if any(has_site) and not all(has_site):
        raise ValueError("save_npz: site ids must be present in all splits or in none")
    arrays: dict[str, np.ndarray] = {}
    for s in SPLITS:
        part: ImageSet = getattr(dataset, s)
        arrays[f"{s}_images"] = np.ascontiguousarray(part.images)
        arrays[f"{s}_labels"] = np.asarray(part.labels, dtype=np.int64)
        if all(has_site):
            arrays[f"{s}_site"] = np.asarray(part.site, dtype=np.int64)
    arrays["n_classes"] = np.asarray(int(dataset.n_classes), dtype=np.int64)
    if dataset.class_names:
        arrays["class_names"] = np.asarray([str(c) for c in dataset.class_names], dtype=str)
    arrays["name"] = np.asarray(str(dataset.name), dtype=str)
    with warnings.catch_warnings():  # classes with no images: warned about when it is loaded
        warnings.simplefilter("ignore", UserWarning)
        dataset_from_arrays(arrays, where=f"save_npz({path})", name=dataset.name, source="")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, ".npz")
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path



def _temp_name(dest: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``dest`` (same file system, so os.replace is atomic); the file
    is created later with the usual permissions."""
    return dest.with_name(f".{dest.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")
