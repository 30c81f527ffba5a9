"""The simulated data set: :func:`simulate_ct` renders every site's images (phantom, then its
scanner) in parallel chunks and splits each site stratified by class."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medchain.data.limits import check_memory
from medchain.data.simulate.kernels import _filter_matrix, _gauss_matrix
from medchain.data.simulate.phantom import _phantoms
from medchain.data.simulate.scanner import _display, _projector, _scan
from medchain.data.simulate.sites import CLASS_NAMES, SiteProfile, site_profile
from medchain.data.types import Dataset, ImageSet


MIN_PER_SITE = 20         # fewer images per site cannot fill three stratified splits
_CHUNK = 500              # images rendered at once (bounds memory to ~150 MB per worker)
_MAX_WORKERS = 4          # render threads


_DATA_SALT = 0xC7DA7A


def _render(rng: np.random.Generator, labels: np.ndarray, prof: SiteProfile, size: int) -> np.ndarray:
    """Simulated uint8 images (B, size, size) of one site for labels (B,)."""
    hu = _phantoms(rng, labels, 2 * size)
    return _display(rng, _scan(rng, hu, prof), prof)


def _largest_remainder(total: int, probs: np.ndarray) -> np.ndarray:
    """Integer counts (K,) summing to ``total`` and closest to ``total * probs``."""
    raw = total * np.asarray(probs, dtype=np.float64)
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _check_args(n, sites, seed, size, site_offset, class_probs, split) -> np.ndarray | None:
    """Validate simulate_ct's arguments; return class_probs as float (sites, 3) or None."""
    for name, v in (("sites", sites), ("seed", seed), ("size", size), ("site_offset", site_offset), ("n", n)):
        if int(v) != v:
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if seed < 0 or site_offset < 0:
        raise ValueError(f"seed and site_offset must be >= 0, got seed={seed}, site_offset={site_offset}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if n < MIN_PER_SITE * sites:
        raise ValueError(f"n={n} is too small for {sites} sites: need at least {MIN_PER_SITE} images "
                         f"per site (n >= {MIN_PER_SITE * sites}) to fill stratified train/val/test splits")
    check_memory(simulation_bytes(int(n), int(size)),
                 f"simulate_ct(n={int(n):,}, size={int(size)})",
                 "simulate fewer images (n) or smaller ones (size), or generate several data sets "
                 "with different seeds / site_offset and train on them one at a time")
    fr = np.asarray(split, dtype=np.float64)
    if fr.shape != (3,) or np.any(fr <= 0) or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"split must be three positive fractions (train, val, test) summing to 1, "
                         f"got {split!r}")
    if class_probs is None:
        return None
    p = np.asarray(class_probs, dtype=np.float64)
    if p.shape != (sites, len(CLASS_NAMES)):
        raise ValueError(f"class_probs must have shape (sites, {len(CLASS_NAMES)}) = ({sites}, "
                         f"{len(CLASS_NAMES)}), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("class_probs must be finite and non-negative")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"each row of class_probs must sum to 1, got row sums "
                         f"{p.sum(axis=1).round(6).tolist()}")
    return p


def simulation_bytes(n: int, size: int) -> int:
    """Peak memory of :func:`simulate_ct` (estimate, bytes): every image is held three times
    (rendered, pooled per split, shuffled copy) with its label, site id and share of the chunk
    seeds (64 B), plus the render buffers of the worker threads (one chunk of ``_CHUNK`` images
    at ``2*size``: about 150 MB per worker at size 28, scaled with the image area)."""
    per_image = 3 * size * size + 64
    render = _MAX_WORKERS * 150e6 * (size / 28.0) ** 2
    return int(n * per_image + render)


def _stratified_counts(class_counts: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Integer table (classes, splits) rounding ``class_counts * split`` cell by cell (each cell
    is its floor or ceiling) so that rows sum to ``class_counts`` and columns to the
    largest-remainder split of the total (a controlled rounding; 3 x 3 is small enough to
    enumerate every up/down pattern and keep the one closest to the exact table)."""
    raw = class_counts[:, None] * split[None, :]
    table = np.floor(raw).astype(np.int64)
    row_left = class_counts - table.sum(axis=1)
    col_left = _largest_remainder(int(class_counts.sum()), split) - table.sum(axis=0)
    k = table.size
    ups = ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1).reshape(-1, *table.shape)
    rows_ok = (ups.sum(axis=2) == row_left).all(axis=1) & ~((raw == table) & (ups == 1)).any(axis=(1, 2))
    ok = rows_ok & (ups.sum(axis=1) == col_left).all(axis=1)
    if not ok.any():        # never seen; keep the class counts exact and let split totals move by 1
        ok = rows_ok
    score = (ups * (raw - table)).sum(axis=(1, 2))
    best = np.flatnonzero(ok)[np.argmax(score[ok])]
    return table + ups[best]


def _split_site(labels: np.ndarray, split: np.ndarray) -> list[np.ndarray]:
    """Indices of train / val / test for one site, stratified by label (labels already shuffled)."""
    classes = np.arange(len(CLASS_NAMES))
    table = _stratified_counts(np.bincount(labels, minlength=len(classes)), split)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in classes:
        ends = np.cumsum(table[c])[:-1]
        for j, chunk in enumerate(np.split(np.flatnonzero(labels == c), ends)):
            parts[j].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _run_jobs(jobs: list, size: int, progress_total: int) -> None:
    """Render chunks ``(images, labels, slice, profile, seed_seq)`` into their images, in threads.

    Each chunk has its own seed, so the result does not depend on the thread schedule. numpy
    and scipy.sparse release the GIL in the heavy kernels; BLAS is held to one thread per
    worker because its small GEMMs only lose from nested threading.
    """
    def render(job) -> int:
        images, labels, sl, prof, css = job
        images[sl] = _render(np.random.Generator(np.random.PCG64(css)), labels[sl], prof, size)
        return len(labels[sl])

    bar = None
    if progress_total:
        from tqdm.auto import tqdm
        bar = tqdm(total=progress_total, desc="simulate_ct", unit="img")
    for prof in {job[3] for job in jobs}:            # fill the caches before the threads share them
        _a, n_det = _projector(2 * size, prof.n_views)
        _filter_matrix(n_det, prof.recon_filter)
        _gauss_matrix(2 * size, prof.blur, wrap=False)
    workers = max(1, min(_MAX_WORKERS, os.cpu_count() or 1, len(jobs)))
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1, user_api="blas")
    except ImportError:        # optional: only a speed matter
        limits = contextlib.nullcontext()
    with limits, ThreadPoolExecutor(workers) as pool:
        for done in pool.map(render, jobs):
            if bar is not None:
                bar.update(done)
    if bar is not None:
        bar.close()


def simulate_ct(n: int = 10000, sites: int = 5, seed: int = 0, *, size: int = 28,
                site_offset: int = 0, class_probs: "np.ndarray | None" = None,
                split: tuple[float, float, float] = (0.7, 0.1, 0.2), progress: bool = False) -> Dataset:
    """Simulate a three-class chest-CT nodule data set acquired at ``sites`` sites.

    n: total images, shared out evenly over the sites (at least MIN_PER_SITE per site).
    sites, site_offset: the sites are ids ``site_offset .. site_offset + sites - 1``; a site's
    scanner and default label mix depend on its id only (see :func:`site_profile`).
    seed: data seed (patients, lesions, noise); the same arguments give byte-identical arrays.
    size: output side, pixels (rendered at 2*size and area-reduced).
    class_probs: optional (sites, 3) label mix per site, rows summing to 1; default: each
    site's own mix (label shift between sites). Per-site class counts are exact roundings.
    split: train / val / test fractions, applied per site and per class.
    Returns a Dataset whose ImageSets hold uint8 (N, size, size) images, int64 labels and site ids.
    """
    probs = _check_args(n, sites, seed, size, site_offset, class_probs, split)
    n, sites, seed, size, site_offset = (int(v) for v in (n, sites, seed, size, site_offset))
    fr = np.asarray(split, dtype=np.float64)
    per_site = _largest_remainder(n, np.full(sites, 1.0 / sites))
    site_data, jobs = [], []
    for i in range(sites):
        site = site_offset + i
        prof = site_profile(site)
        n_site = int(per_site[i])
        mix = probs[i] if probs is not None else np.asarray(prof.class_mix)
        # One seed stream per (seed, site): a site's images do not depend on the other sites.
        ss = np.random.SeedSequence([_DATA_SALT, int(seed), site])
        label_ss, *chunk_ss = ss.spawn(1 + -(-n_site // _CHUNK))
        labels = np.repeat(np.arange(len(CLASS_NAMES)), _largest_remainder(n_site, mix))
        labels = np.random.Generator(np.random.PCG64(label_ss)).permutation(labels).astype(np.int64)
        images = np.empty((n_site, size, size), dtype=np.uint8)
        site_data.append((site, labels, images))
        jobs += [(images, labels, slice(k * _CHUNK, (k + 1) * _CHUNK), prof, css)
                 for k, css in enumerate(chunk_ss)]
    _run_jobs(jobs, size, n if progress else 0)

    pieces: list[list[ImageSet]] = [[], [], []]
    for site, labels, images in site_data:
        site_ids = np.full(len(labels), site, dtype=np.int64)
        for j, idx in enumerate(_split_site(labels, fr)):
            pieces[j].append(ImageSet(images[idx], labels[idx], site_ids[idx]))
    shuffle = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_DATA_SALT, int(seed)])))
    splits = []
    for parts in pieces:
        s = ImageSet.concat(parts)
        splits.append(s.subset(shuffle.permutation(len(s))))
    params = {"n": n, "sites": sites, "seed": seed, "size": size, "site_offset": site_offset,
              "class_probs": None if probs is None else probs.tolist(),
              "split": [float(f) for f in fr]}
    generator = "medchain.data.simulate.simulate_ct"
    digest = hashlib.sha256(json.dumps({"generator": generator, "params": params},
                                       sort_keys=True).encode()).hexdigest()
    return Dataset(name="simulated_ct", train=splits[0], val=splits[1], test=splits[2],
                   n_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
                   source=f"simulated:n={n},sites={sites},seed={seed},site_offset={site_offset},size={size}",
                   origin={"kind": "simulated", "generator": generator, "params": params,
                           "sha256": digest})
