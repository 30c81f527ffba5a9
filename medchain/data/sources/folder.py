"""A folder of images as a source: one sub-folder per class (PNG/JPEG), optionally below
``train/ val/ test/`` folders (else a stratified 70/10/20 split), every image resized to
``image_size × image_size``."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..types import Dataset, ImageSet
from .layout import SPLITS, check_class_coverage, file_digests
from .registry import register_source

__all__ = ["load_folder"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: _natural_key(p.name))


def _image_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in _IMAGE_SUFFIXES), key=lambda p: _natural_key(p.name))
    if not files:
        raise ValueError(f"empty class folder: {folder} holds no PNG/JPEG images "
                         f"({', '.join(_IMAGE_SUFFIXES)}); remove it or add images")
    return files


def _read_image(path: Path, size: int) -> tuple[np.ndarray, bool]:
    """One image resized to size×size: (array, is_grey); array is (size, size) for grey sources
    and (size, size, 3) for colour ones (is_grey tells whether its three channels are equal)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode.startswith("I") or mode == "F":
                a = np.asarray(im, dtype=np.float64)
                if a.ndim != 2:
                    raise ValueError(f"unexpected array shape {a.shape} for mode {mode}")
                lo, hi = float(a.min()), float(a.max())
                if lo >= 0 and hi <= 255:
                    pass
                elif lo >= 0 and hi <= 65535:
                    a = a / 257.0  # 16-bit grey to 8 bits
                else:
                    a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
                im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
            elif mode in ("1", "L", "LA"):
                im = im.convert("L")
            else:
                im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8).copy()
    except Exception as exc:  # Pillow raises many types for bad files
        raise ValueError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim == 2:
        return arr, True
    return arr, bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all())


def _stratified_split(labels: np.ndarray, seed: int = 0,
                      fractions=(0.7, 0.1, 0.2)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified train/val/test index split (per class: shuffle with ``seed``,
    round the val and test counts, the rest is train, at least one train image per class)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        while n_val + n_test > n - 1 and n_val + n_test > 0:
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        n_train = n - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train:n_train + n_val])
        parts[2].append(idx[n_train + n_val:])
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
                 for p in parts)  # type: ignore[return-value]


@register_source("folder")
def load_folder(spec: str | os.PathLike, *, image_size: int, **_) -> Dataset:
    """The images below the folder ``spec``, resized to ``image_size × image_size``."""
    folder, size = Path(spec), image_size
    top = _subdirs(folder)
    split_dirs = {p.name.lower(): p for p in top if p.name.lower() in SPLITS}
    if split_dirs:
        missing = [s for s in SPLITS if s not in split_dirs]
        if missing:
            raise ValueError(f"{folder}: has {', '.join(sorted(split_dirs))}/ but not "
                             f"{', '.join(missing)}/; give all of train/, val/, test/ (each with "
                             "one sub-folder per class) or none (then medchain splits 70/10/20)")
        per_split = {s: {p.name: p for p in _subdirs(split_dirs[s])} for s in SPLITS}
        names = sorted(set().union(*per_split.values()), key=_natural_key)
    else:
        per_split = {"all": {p.name: p for p in top}}
        names = [p.name for p in top]
    if not names:
        raise ValueError(f"{folder}: no class sub-folders found; put the images of each class in "
                         "their own sub-folder (folder/<class>/*.png), optionally below "
                         "train/, val/, test/")
    label_of = {n: i for i, n in enumerate(names)}

    images: list[np.ndarray] = []
    labels: list[int] = []
    split_of: list[str] = []
    grey: list[bool] = []
    listing = hashlib.sha256()  # every file's path (relative to the folder) and content
    n_files = 0
    for split, classes in per_split.items():
        for cname in sorted(classes, key=_natural_key):
            for f in _image_files(classes[cname]):
                listing.update(f.relative_to(folder).as_posix().encode() + b"\0")
                listing.update(file_digests(f)[1].encode() + b"\n")
                n_files += 1
                arr, g = _read_image(f, size)
                images.append(arr)
                labels.append(label_of[cname])
                split_of.append(split)
                grey.append(g)
    all_grey = all(grey)
    if all_grey:
        images = [a if a.ndim == 2 else a[..., 0] for a in images]
    else:
        images = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in images]
    x = np.stack(images).astype(np.uint8)
    y = np.asarray(labels, dtype=np.int64)
    where = np.asarray(split_of)
    if split_dirs:
        idx = [np.flatnonzero(where == s) for s in SPLITS]
    else:
        idx = list(_stratified_split(y, seed=0))
    sets = {s: ImageSet(x[i], y[i]) for s, i in zip(SPLITS, idx)}
    for s in SPLITS:
        if len(sets[s]) == 0:
            how = (f"its {s}/ folder has no images" if split_dirs else
                   f"{len(y)} images are too few for a 70/10/20 split per class (the {s} split is "
                   "empty); add images or give train/, val/, test/ folders yourself")
            raise ValueError(f"{folder}: {how}")
    check_class_coverage(sets, len(names), list(names), str(folder))
    return Dataset(name=folder.name, train=sets["train"], val=sets["val"], test=sets["test"],
                   n_classes=len(names), class_names=list(names), source=str(folder.resolve()),
                   origin={"kind": "folder", "file": str(folder.resolve()),
                           "sha256": listing.hexdigest(), "n_files": n_files,
                           "image_size": size})
