"""Where a data set came from, as a small JSON-ready dict for run summaries."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .types import Dataset

__all__ = ["content_sha256", "data_provenance"]

_SPLITS = ("train", "val", "test")

#: What ``sha256`` is the hash of, per kind of origin.
_SHA256_OF = {"medmnist": "file", "npz": "file", "folder": "folder (paths and file contents)",
              "simulated": "generator parameters"}


def content_sha256(dataset: Dataset) -> str:
    """SHA-256 of the arrays themselves (per split: image shape and bytes, int64 labels, site
    ids), whatever the source: equal for a simulated set and its saved .npz copy."""
    h = hashlib.sha256()
    for s in _SPLITS:
        part = getattr(dataset, s)
        images = np.ascontiguousarray(part.images)
        h.update(f"{s} {images.dtype.str} {images.shape}\n".encode())
        h.update(images.tobytes())
        h.update(np.ascontiguousarray(part.labels, dtype=np.int64).tobytes())
        if part.site is not None:
            h.update(b"site")
            h.update(np.ascontiguousarray(part.site, dtype=np.int64).tobytes())
    return h.hexdigest()


def data_provenance(dataset: Dataset) -> dict[str, Any]:
    """Provenance of ``dataset`` for a summary (JSON-serialisable).

    Keys: ``name``, ``source`` (the string it was loaded from), ``kind`` (``medmnist``, ``npz``,
    ``folder``, ``simulated`` or ``in-memory``), ``file`` (the file or folder read, else None),
    ``sha256`` (of that file; for a folder, of its files' paths and contents; for simulated data,
    of the generator name and parameters; None in memory) and ``sha256_of`` saying which,
    ``content_sha256`` (:func:`content_sha256`), ``n`` (images per split), ``n_total``,
    ``n_classes``, ``class_names``, ``image_shape``, ``n_channels``, ``n_sites`` (None without
    site ids). Per kind also: ``md5``, ``official_md5`` (True when the MD5 is the official
    MedMNIST one; for an .npz only when it is named like a MedMNIST set), ``downloaded``, ``url``
    (medmnist); ``generator``, ``params`` (simulated); ``n_files``,
    ``image_size`` (folder).
    """
    origin = dict(dataset.origin or {})
    kind = origin.pop("kind", "in-memory")
    n = {s: len(getattr(dataset, s)) for s in _SPLITS}
    sites = [getattr(dataset, s).site for s in _SPLITS]
    out: dict[str, Any] = {
        "name": dataset.name,
        "source": dataset.source,
        "kind": kind,
        "file": origin.pop("file", None),
        "sha256": origin.pop("sha256", None),
        "sha256_of": _SHA256_OF.get(kind),
        "content_sha256": content_sha256(dataset),
        "n": n,
        "n_total": sum(n.values()),
        "n_classes": int(dataset.n_classes),
        "class_names": [str(c) for c in dataset.class_names],
        "image_shape": [int(v) for v in dataset.image_shape],
        "n_channels": int(dataset.n_channels),
        "n_sites": None if any(s is None for s in sites)
        else int(np.unique(np.concatenate(sites)).size),
    }
    out.update(origin)
    return out
