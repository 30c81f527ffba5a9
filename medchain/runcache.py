"""A cache of finished training runs, keyed by a digest of everything the result depends on.

Key: SHA-256 over the run's kind, the institutions' data exactly as partitioned (images and
labels of every split, so data set, partition and seed are all in it), the model name, the
recipe (TrainConfig), the code version (a digest of every medchain source file) and the torch
build, CPU capability and thread count (trained weights depend on them). A changed byte in any
of them misses. An entry is a folder ``<root>/<key>/`` with ``meta.json`` (what the caller keeps:
rows, histories, the key's parts) and ``tensors.pt`` (state dicts), written to a temporary
folder and renamed, so a crashed run leaves no half entry.

Root: ``$MEDCHAIN_RUN_CACHE``; unset, ``results/cache`` of the source checkout (git-ignored) or
``~/.cache/medchain/runs`` for an installed package. ``MEDCHAIN_RUN_CACHE=off`` switches it off.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

ENV = "MEDCHAIN_RUN_CACHE"
OFF = ("off", "0", "false", "no", "none")


def root() -> Path | None:
    """The cache folder, or None when switched off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").exists() and (repo / "results").is_dir():
        return repo / "results" / "cache"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medchain" / "runs"


@functools.cache
def code_version() -> str:
    """SHA-256 over the relative path and bytes of every medchain/*.py file."""
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(pkg.rglob("*.py")):
        h.update(str(path.relative_to(pkg)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _runtime() -> dict:
    import torch
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def data_digest(institutions) -> str:
    """SHA-256 over each institution's index and its train / val / test images and labels."""
    h = hashlib.sha256()
    for inst in institutions:
        h.update(str(inst.index).encode())
        for split in (inst.train, inst.val, inst.test):
            for a in (split.images, split.labels):
                a = np.ascontiguousarray(a)
                h.update(f"{a.dtype.str}{a.shape}".encode())
                h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def key(kind: str, institutions, **parts) -> tuple[str, dict]:
    """(hex key, the parts it was computed from). parts must be JSON values (recipe, model…)."""
    material = {"kind": kind, "data": data_digest(institutions), "code": code_version(), **_runtime(), **parts}
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), material


def _plain(x):
    """numpy scalars / arrays → Python values for JSON."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in the run cache's meta.json")


def load(k: str) -> tuple[dict, object] | None:
    """(meta, tensors) of entry `k`, or None (a miss, or the cache is off)."""
    base = root()
    if base is None or not (base / k / "meta.json").exists():
        return None
    import torch
    meta = json.loads((base / k / "meta.json").read_text())
    return meta, torch.load(base / k / "tensors.pt", weights_only=True)


def store(k: str, meta: dict, tensors) -> Path | None:
    """Write entry `k` (meta: JSON values; NaN allowed; tensors: what torch.save takes with
    weights_only loading). Returns its folder, or None when the cache is off."""
    base = root()
    if base is None:
        return None
    import torch
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=".tmp-"))
    try:
        (tmp / "meta.json").write_text(json.dumps(meta, default=_plain, allow_nan=True))
        torch.save(tensors, tmp / "tensors.pt")
        try:
            os.rename(tmp, base / k)
        except OSError:          # another process stored the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return base / k

