"""Resource bounds checked *before* large allocations, so that a bad input fails fast with one
clear message instead of a MemoryError minutes later (or a machine that swaps).

The estimates are deliberately simple upper-side figures (documented on each function); the
budget is a fraction of the memory this process can still get (:func:`available_memory`).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MIN_IMAGE_SIDE", "ResourceLimitError", "available_memory", "check_class_count", "check_memory",
           "class_count_bytes", "format_bytes"]

#: Smallest image side the models accept: SmallCNN has two 2×2 max-pools (4 → 2 → 1 pixel).
MIN_IMAGE_SIDE = 4

#: Share of the available memory one allocation may plan to use.
MEMORY_FRACTION = 0.8

#: Assumed features in front of a model's classification head (timm backbones have up to 2048,
#: medchain's CNNs 64; 512 keeps the estimate on the safe side for the models used here).
HEAD_FEATURES = 512


class ResourceLimitError(ValueError, MemoryError):
    """An input asks for more memory than this machine has: refused before allocating. A
    ValueError (the input is what is wrong; command-line tools report it as such) and a
    MemoryError."""


def format_bytes(n: float) -> str:
    """``1.5 GB``-style text (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    raise AssertionError("unreachable")


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2 or v1) memory limit, or None if unlimited."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            usage = int(Path(usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory() -> int:
    """Bytes of memory this process can still allocate: ``MemAvailable`` of /proc/meminfo (or
    the free physical pages), capped by the cgroup limit; 8 GB when neither can be read."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 * 10**9
    room = _cgroup_room()
    return int(avail if room is None else min(avail, room))


def check_memory(n_bytes: float, what: str, fix: str) -> None:
    """Raise :class:`ResourceLimitError` (before anything is allocated) when ``n_bytes`` exceeds
    :data:`MEMORY_FRACTION` of :func:`available_memory`. ``what`` names the request, ``fix`` says
    what to change."""
    budget = MEMORY_FRACTION * available_memory()
    if n_bytes > budget:
        raise ResourceLimitError(f"{what} would need about {format_bytes(n_bytes)} of memory, more than "
                          f"the {format_bytes(budget)} this machine has available "
                          f"({MEMORY_FRACTION:.0%} of the free memory); {fix}")


def class_count_bytes(n_classes: int, n_images: int) -> int:
    """Memory that ``n_classes`` classes cost downstream, per the largest split of ``n_images``:
    a class name (64 B), the model head with its gradient and two Adam moments
    (4 × 4 B × :data:`HEAD_FEATURES`), and the evaluation's float64 probability matrix with its
    copies (4 × 8 B per image)."""
    return int(n_classes) * (64 + 16 * HEAD_FEATURES + 32 * max(int(n_images), 1))


def check_class_count(n_classes: int, n_images: int, where: str, how: str = "") -> None:
    """Refuse a class count whose downstream memory (:func:`class_count_bytes`) does not fit.

    ``how`` says where the count came from (e.g. "largest label 1000000000, no n_classes in the
    file"); the message tells how to remap labels to 0 .. K-1."""
    need = class_count_bytes(n_classes, n_images)
    check_memory(need, f"{where}: {n_classes:,} classes{' (' + how + ')' if how else ''}",
                 "labels must be class indices 0 .. K-1 with K the number of classes; remap "
                 "them, e.g. `_, y = np.unique(y, return_inverse=True)` over all splits, or give "
                 "the true class count (n_classes)")
