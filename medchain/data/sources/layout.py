"""The MedMNIST array layout that every file source shares: reading an ``.npz`` archive,
validating its ``{train,val,test}_{images,labels}`` (and optional ``*_site``) arrays into a
:class:`~medchain.data.types.Dataset`, the class-coverage check, and file digests."""
from __future__ import annotations

import hashlib
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..limits import MIN_IMAGE_SIDE, check_class_count
from ..types import Dataset, ImageSet

__all__ = ["SPLITS", "check_class_coverage", "dataset_from_arrays", "file_digests", "read_npz"]

SPLITS = ("train", "val", "test")


def file_digests(path: Path) -> tuple[str, str]:
    """(MD5, SHA-256) of a file, in one read."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()



def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, with unreadable files turned into a clear ValueError."""
    try:
        obj = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        # numpy tries pickle on anything that is neither a zip nor an .npy file
        raise ValueError(f"{path}: cannot read it as an .npz file (it is neither a zip archive "
                         "of .npy arrays nor an .npy array); it is corrupt, truncated or not an "
                         ".npz file") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path}: cannot read it as an .npz file ({type(exc).__name__}: {exc}); "
                         "it is corrupt, truncated or not an .npz file") from exc
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array {getattr(obj, 'shape', '')}, not an .npz "
                         "archive with train_images, train_labels, val_images, ... arrays")
    try:
        with obj:
            arrays = {k: obj[k] for k in obj.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ValueError(f"{path}: an array in it holds Python objects (pickled data), which "
                             "medchain does not load; store numeric arrays (images uint8, labels "
                             "int)") from exc
        raise ValueError(f"{path}: cannot read an array from it ({exc}); the file is corrupt or "
                         "truncated") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path}: cannot read an array from it ({type(exc).__name__}: {exc}); "
                         "the file is corrupt or truncated") from exc
    bad = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: member(s) {', '.join(bad)} of the archive are not .npy arrays; "
                         "the file is corrupt or was not written by numpy.savez")
    return arrays



def _integers(a: np.ndarray, where: str, what: str) -> np.ndarray:
    """``a`` as int64, refusing non-integer values."""
    if a.dtype == bool:
        return a.astype(np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: {what} contain NaN or infinite values")
        if (a != np.round(a)).any():
            bad = a[a != np.round(a)].flat[0]
            raise ValueError(f"{where}: {what} must be integers, found the non-integer value "
                             f"{bad}")
        return a.astype(np.int64)
    raise ValueError(f"{where}: {what} must be integers, got dtype {a.dtype}")


def _check_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        hint = ""
        if x.dtype.kind == "f":
            hint = (" Convert float images in [0, 1] with (np.clip(x, 0, 1) * 255).round()"
                    ".astype(np.uint8), or in [0, 255] with np.clip(x, 0, 255).round()"
                    ".astype(np.uint8).")
        elif x.dtype.kind in "iu":
            hint = (" Convert integer images in [0, 255] with x.astype(np.uint8); rescale "
                    "16-bit images first, e.g. (x // 257).astype(np.uint8).")
        raise ValueError(f"{where}: images must be uint8, got dtype {x.dtype}.{hint}")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise ValueError(f"{where}: images must have shape (N, H, W) for grey-scale or "
                         f"(N, H, W, 3) for colour, got {x.shape}")
    if x.shape[1] < MIN_IMAGE_SIDE or x.shape[2] < MIN_IMAGE_SIDE:
        raise ValueError(f"{where}: images are {x.shape[1]}×{x.shape[2]} pixels, too small for "
                         f"medchain's models: the minimum is {MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE} "
                         "(two 2×2 max-pools); MedMNIST uses 28×28. Resize the images (e.g. "
                         "PIL.Image.resize) before saving them")
    return x


def _check_vector(a: np.ndarray, n: int, where: str, what: str) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 2 and what == "labels":
        raise ValueError(f"{where}: labels have shape {a.shape}, i.e. {a.shape[1]} labels per "
                         "image (multi-label); medchain trains single-label classifiers and "
                         "needs one class per image, labels shaped (N,) or (N, 1)")
    if a.ndim != 1:
        raise ValueError(f"{where}: {what} must have shape (N,) or (N, 1), got {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{where}: {n} images but {a.shape[0]} {what}")
    a = _integers(a, where, what)
    if what == "labels" and (a < 0).any():
        raise ValueError(f"{where}: labels must be non-negative class indices, found "
                         f"{int(a.min())}")
    return a


def dataset_from_arrays(arrays: dict[str, np.ndarray], *, where: str, name: str, source: str,
                         official: dict[str, Any] | None = None,
                         strict: bool = False) -> Dataset:
    """Validate MedMNIST-layout arrays and build a Dataset.

    n_classes and class names: with ``strict``, the ``official`` MedMNIST entry's; else the file's
    ``n_classes`` / ``class_names`` keys when present; else the ``official`` entry's when given and
    the labels fit; else max label + 1 and ``"0", "1", ...``.
    """
    required = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (found: "
                         f"{', '.join(sorted(arrays)) or 'none'}); a data set .npz needs "
                         f"{', '.join(required)} (MedMNIST layout) and optionally "
                         "train_site, val_site, test_site")
    has_site = [f"{s}_site" in arrays for s in SPLITS]
    if any(has_site) and not all(has_site):
        raise ValueError(f"{where}: site arrays must be given for all splits or none; found only "
                         f"{', '.join(f'{s}_site' for s, h in zip(SPLITS, has_site) if h)}")
    sets = {}
    for s in SPLITS:
        x = _check_images(arrays[f"{s}_images"], f"{where}: {s}_images")
        n = x.shape[0]
        y = _check_vector(arrays[f"{s}_labels"], n, f"{where}: {s}_labels", "labels")
        site = None
        if all(has_site):
            site = _check_vector(arrays[f"{s}_site"], n, f"{where}: {s}_site", "site ids")
        sets[s] = ImageSet(x, y, site)
    shapes = {s: sets[s].images.shape[1:] for s in SPLITS}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{where}: the splits' images differ in shape: "
                         + ", ".join(f"{s} {shapes[s]}" for s in SPLITS))
    for s in SPLITS:
        if len(sets[s]) == 0:
            total = sum(len(v) for v in sets.values())
            what = "the data set is empty (no images at all)" if total == 0 else \
                f"the {s} split is empty"
            raise ValueError(f"{where}: {what}; every split needs at least one image")

    top_label = max(int(sets[s].labels.max()) for s in SPLITS)
    class_names: list[str] = []
    if strict and official is not None:
        n_classes = len(official["label"])
        class_names = list(official["label"])
    else:
        if "n_classes" in arrays:
            nc = arrays["n_classes"]
            if nc.shape != () or nc.dtype.kind not in "iu" or int(nc) < 1:
                raise ValueError(f"{where}: n_classes must be a positive integer scalar, got "
                                 f"{nc!r}")
            n_classes = int(nc)
        elif official is not None and "class_names" not in arrays \
                and top_label < len(official["label"]):
            n_classes = len(official["label"])
            class_names = list(official["label"])
        else:
            n_classes = top_label + 1
        how = (f"n_classes = {n_classes} in the file" if "n_classes" in arrays else
               f"largest label {top_label}, no n_classes in the file")
        check_class_count(n_classes, max(len(v) for v in sets.values()), where, how)
        if "class_names" in arrays:
            cn = arrays["class_names"]
            if cn.ndim != 1 or cn.dtype.kind != "U" or len(cn) != n_classes:
                raise ValueError(f"{where}: class_names must be a 1-D string array of length "
                                 f"n_classes={n_classes}, got {cn.dtype} {cn.shape}")
            class_names = [str(c) for c in cn]
    for s in SPLITS:
        top = int(sets[s].labels.max())
        if top >= n_classes:
            raise ValueError(f"{where}: {s}_labels has label {top}, out of range for "
                             f"n_classes={n_classes} (labels must be 0 .. {n_classes - 1})")
    check_class_coverage(sets, n_classes, class_names, where)
    if not class_names:
        class_names = [str(c) for c in range(n_classes)]
    return Dataset(name=name, train=sets["train"], val=sets["val"], test=sets["test"],
                   n_classes=n_classes, class_names=list(class_names), source=source)


def _list_classes(classes, names) -> str:
    shown = [f"{c} ({names[c]!r})" if c < len(names) else str(c) for c in classes[:10]]
    more = f" and {len(classes) - 10:,} more" if len(classes) > 10 else ""
    return ", ".join(shown) + more


def check_class_coverage(sets: dict[str, ImageSet], n_classes: int, names: list[str],
                          where: str) -> None:
    """A class with val/test images but no training image is an error (a model cannot learn a
    class it never sees, and the per-class metrics would be meaningless: the split is almost
    surely wrong). Classes with no image in any split only warn (``n_classes`` may declare
    classes a file does not hold, e.g. a subset of a larger set)."""
    counts = {s: np.bincount(sets[s].labels, minlength=n_classes) for s in SPLITS}
    untrained = np.flatnonzero((counts["train"] == 0) & ((counts["val"] + counts["test"]) > 0))
    if untrained.size:
        detail = "; ".join(f"class {c}: {counts['val'][c]} val and {counts['test'][c]} test"
                           for c in untrained[:5])
        raise ValueError(f"{where}: class(es) {_list_classes(untrained.tolist(), names)} have no "
                         f"training images but appear in val/test ({detail}). A model cannot "
                         "learn a class it never sees; move some of those images into the train "
                         "split, or relabel or drop the class")
    absent = np.flatnonzero(sum(counts.values()) == 0)
    if absent.size:
        warnings.warn(f"{where}: {absent.size:,} of {n_classes:,} classes have no images in any "
                      f"split: {_list_classes(absent.tolist(), names)}. Models get an output for "
                      "each of them that no image trains; if the labels are not 0 .. K-1, remap "
                      "them", UserWarning, stacklevel=4)
