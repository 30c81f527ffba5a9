"""Split a data set among institutions.

Every institution gets its own train / val / test: disjoint subsets of the data set's train / val /
test splits. Deterministic by ``seed``; no image is given to two institutions.

Schemes (``scheme=``):

``"iid"``
    Stratified and balanced: every institution gets the same label mix and (±1 per class) the
    same number of images.
``"dirichlet"``
    Label skew, the literature's per-class convention (Hsu et al. 2019, "Measuring the effects of
    non-identical data distribution for federated visual classification"; flwr-datasets
    ``DirichletPartitioner``): for every class *c*, the institutions' shares of that class are
    drawn once, ``p_c ~ Dir(alpha · 1_n)`` over the *n* institutions, and class *c*'s images are
    cut in those proportions. So ``alpha`` here is comparable with published ``alpha``: each share
    has mean ``1/n`` and variance ``(1/n)(1 - 1/n) / (n·alpha + 1)``. Small ``alpha`` (0.1) gives
    each class to one or two institutions (with fewer classes than institutions, some
    institutions then get almost nothing and ``min_size`` forces redraws); large ``alpha`` (100)
    is close to IID. The same draw is applied to train, val and test, so an institution's test
    split has its own label mix.
``"dirichlet_mix"``
    medchain's earlier label skew (named ``"dirichlet"`` before the per-class convention was
    adopted; kept so that old runs reproduce bit for bit): each institution *i* draws its own
    label mix ``q_i ~ Dir(alpha · 1_K)`` over the *K* classes, once; class *c*'s images go to the
    institutions in the ratio ``q_1c : q_2c : ... : q_nc``. Its ``alpha`` is not the published one.
``"quantity"``
    Quantity skew: sizes proportional to ``w_i ~ LogNormal(0, quantity_sigma)``; labels IID
    (stratified). The same sizes apply to train, val and test.
``"sites"``
    Natural sites: institution *i* holds the images of the *i*-th distinct site id (ascending).
    Needs ``site`` arrays in every split.

``fraction`` < 1 models data scarcity: every institution keeps only that fraction of its *train*
split (stratified, at least one image of each class it holds when possible); val and test are kept.

Allocation. For every class, the class's images are shuffled and cut into per-institution counts
that are the target ``share × n_class`` rounded down or up (largest-remainder rounding; ties go to
the institution furthest below its running total target, so IID totals stay balanced).
"""
from __future__ import annotations

import numpy as np

from .limits import check_class_count
from .types import Dataset, ImageSet, InstitutionData

__all__ = ["DIRICHLET_SCHEMES", "SCHEMES", "draw_shares", "partition", "partition_indices", "partition_plan"]

#: Partition schemes accepted by :func:`partition`.
SCHEMES = ("iid", "dirichlet", "dirichlet_mix", "quantity", "sites")

#: Schemes whose shares are drawn from a Dirichlet distribution (they take ``alpha``).
DIRICHLET_SCHEMES = ("dirichlet", "dirichlet_mix")

#: How many times a random scheme is redrawn before giving up on ``min_size``.
MAX_TRIES = 100

_SPLITS = ("train", "val", "test")


# ============================================================================================
# argument checks
# ============================================================================================
def _check_args(n_institutions, scheme, alpha, quantity_sigma, fraction, min_size) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: "
                         f"{', '.join(SCHEMES)}")
    if n_institutions is None:
        if scheme != "sites":
            raise ValueError(f"n_institutions is required for scheme {scheme!r} (None is "
                             "allowed only with scheme 'sites': one institution per site)")
    elif isinstance(n_institutions, bool) or not isinstance(n_institutions, (int, np.integer)):
        raise ValueError(f"n_institutions must be an integer >= 1, got {n_institutions!r}")
    elif n_institutions < 1:
        raise ValueError(f"n_institutions must be >= 1, got {n_institutions}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha (Dirichlet concentration) must be > 0, got {alpha}")
    if not np.isfinite(quantity_sigma) or quantity_sigma < 0:
        raise ValueError(f"quantity_sigma must be >= 0, got {quantity_sigma}")
    if not (np.isfinite(fraction) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _labels(labels, what: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D integer array, got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{what} must be non-negative, found {int(y.min())}")
    return y


# ============================================================================================
# shares and allocation
# ============================================================================================
def draw_shares(scheme: str, n_institutions: int, n_classes: int, rng: np.random.Generator, *,
                alpha: float = 0.5, quantity_sigma: float = 1.0) -> np.ndarray:
    """Matrix ``P`` (n_institutions, n_classes): ``P[i, c]`` is the share of class *c*'s images
    that institution *i* receives; every column sums to 1."""
    n, k = int(n_institutions), int(n_classes)
    if scheme == "iid":
        return np.full((n, k), 1.0 / n)
    if scheme == "quantity":
        w = rng.lognormal(0.0, quantity_sigma, size=n)
        return np.repeat((w / w.sum())[:, None], k, axis=1)
    if scheme == "dirichlet":
        # per class: that class's shares over the n institutions ~ Dir(alpha 1_n)
        return rng.dirichlet(np.full(n, float(alpha)), size=k).T
    if scheme == "dirichlet_mix":
        q = rng.dirichlet(np.full(k, float(alpha)), size=n)  # row i: institution i's label mix
        col = q.sum(axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(col > 0, q / np.where(col > 0, col, 1.0), 1.0 / n)
        return p
    raise ValueError(f"draw_shares: scheme {scheme!r} has no shares; valid: iid, dirichlet, "
                     "dirichlet_mix, quantity")


def _allocate(labels: np.ndarray, shares: np.ndarray,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Cut every class's shuffled indices into per-institution counts (see module docstring)."""
    n = shares.shape[0]
    target = np.zeros(n)
    given = np.zeros(n, dtype=np.int64)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(shares.shape[1]):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        idx = rng.permutation(idx)
        t = shares[:, c] * idx.size
        base = np.floor(t + 1e-9).astype(np.int64)
        base = np.minimum(base, idx.size)
        rest = idx.size - int(base.sum())
        target += t
        if rest > 0:
            deficit = np.round(target - (given + base), 9)
            frac = np.round(t - base, 9)
            order = np.lexsort((np.arange(n), -deficit, -frac))
            base[order[:rest]] += 1
        elif rest < 0:  # cannot happen with column sums of 1; guard against rounding
            for i in np.argsort(-(base - t))[: -rest]:
                base[i] -= 1
        given += base
        for i, piece in enumerate(np.split(idx, np.cumsum(base)[:-1])):
            parts[i].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
            for p in parts]


def _take_fraction(idx: np.ndarray, labels: np.ndarray, fraction: float,
                   rng: np.random.Generator) -> np.ndarray:
    """A stratified random ``fraction`` of ``idx`` (``round(fraction · n)`` images, at least one,
    at least one per class present when that many are kept)."""
    if fraction >= 1 or idx.size == 0:
        return idx
    n = idx.size
    k = max(1, int(round(fraction * n)))
    classes, counts = np.unique(labels[idx], return_counts=True)
    if k >= classes.size:
        t = counts * (k / n)
        a = np.maximum(1, np.floor(t + 1e-9)).astype(np.int64)
        while a.sum() > k:  # floors lifted to 1 overshoot: take back where most above target
            over = np.where(a > 1, a - t, -np.inf)
            a[int(np.argmax(over))] -= 1
        while a.sum() < k:
            a[int(np.argmax(np.where(a < counts, t - a, -np.inf)))] += 1
    else:  # fewer images than classes: one image each of the k largest classes
        a = np.zeros_like(counts)
        a[np.lexsort((np.arange(classes.size), -counts))[:k]] = 1
    keep = []
    for c, m in zip(classes, a):
        if m:
            own = idx[labels[idx] == c]
            keep.append(rng.choice(own, size=int(m), replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64)


# ============================================================================================
# public API
# ============================================================================================
def partition_indices(labels, n_institutions: int | None, scheme: str = "iid", *,
                      alpha: float = 0.5, quantity_sigma: float = 1.0, seed=0, min_size: int = 1,
                      sites=None, n_classes: int | None = None,
                      shares: np.ndarray | None = None) -> list[np.ndarray]:
    """Split one split's images among institutions; returns one sorted int64 index array per
    institution (indices into ``labels``), disjoint.

    labels: (N,) int class labels. sites: (N,) int site ids (scheme ``"sites"`` only).
    shares: an (n_institutions, n_classes) matrix from :func:`draw_shares` to apply instead of
    drawing one (how :func:`partition` applies one draw to train, val and test). Without
    ``shares``, a random scheme is redrawn until every institution has at least ``min_size``
    images (at most :data:`MAX_TRIES` draws), then ValueError. ``seed``: int or numpy Generator.
    """
    _check_args(n_institutions, scheme, alpha, quantity_sigma, 1.0, min_size)
    y = _labels(labels)
    rng = _rng(seed)
    if scheme == "sites":
        if sites is None:
            raise ValueError("scheme 'sites' needs per-image site ids (sites=...)")
        site = _labels(sites, "sites")
        if site.shape != y.shape:
            raise ValueError(f"sites has shape {site.shape}, labels {y.shape}")
        ids = np.unique(site)
        _check_site_count(ids, n_institutions)
        out = [np.flatnonzero(site == s).astype(np.int64) for s in ids]
        small = [int(s) for s, o in zip(ids, out) if o.size < min_size]
        if small:
            raise ValueError(f"site(s) {small} have fewer than min_size={min_size} images")
        return out
    n = int(n_institutions)
    if n * max(min_size, 1) > y.size:
        raise ValueError(f"more institutions than images: {y.size} images cannot give "
                         f"{n} institutions at least {max(min_size, 1)} each")
    k = int(n_classes) if n_classes is not None else (int(y.max()) + 1 if y.size else 1)
    check_class_count(k, y.size, "partition_indices",
                      "n_classes given" if n_classes is not None else f"largest label {k - 1}")
    if y.size and y.max() >= k:
        raise ValueError(f"label {int(y.max())} out of range for n_classes={k}")
    if shares is not None:
        shares = np.asarray(shares, dtype=np.float64)
        if shares.ndim != 2 or shares.shape[0] != n or shares.shape[1] < k:
            raise ValueError(f"shares must have shape ({n}, >= {k}), got {shares.shape}")
        return _allocate(y, shares, rng)
    tries = 1 if scheme == "iid" else MAX_TRIES
    for _ in range(tries):
        out = _allocate(y, draw_shares(scheme, n, k, rng, alpha=alpha,
                                       quantity_sigma=quantity_sigma), rng)
        if min(o.size for o in out) >= min_size:
            return out
    raise ValueError(f"could not split {y.size} images into {n} institutions with at least "
                     f"min_size={min_size} each by scheme {scheme!r} in {tries} draws; use "
                     "fewer institutions, a smaller min_size"
                     + (", or a larger alpha" if scheme in DIRICHLET_SCHEMES else
                        ", or a smaller quantity_sigma" if scheme == "quantity" else ""))


def _check_site_count(ids: np.ndarray, n_institutions) -> None:
    if n_institutions is not None and int(n_institutions) != ids.size:
        raise ValueError(f"scheme 'sites' makes one institution per site: the data have "
                         f"{ids.size} sites ({', '.join(str(int(s)) for s in ids)}), so "
                         f"n_institutions must be {ids.size} or None, got {n_institutions}")


def partition_plan(dataset: Dataset, n_institutions: int | None, scheme: str = "iid", *,
                   alpha: float = 0.5, quantity_sigma: float = 1.0, fraction: float = 1.0,
                   seed: int = 0, min_size: int = 2) -> list[dict[str, np.ndarray]]:
    """The indices behind :func:`partition`: per institution, ``{"train": idx, "val": idx,
    "test": idx}`` (sorted int64 indices into the data set's own splits)."""
    _check_args(n_institutions, scheme, alpha, quantity_sigma, fraction, min_size)
    rng = _rng(seed)
    splits: dict[str, ImageSet] = {s: getattr(dataset, s) for s in _SPLITS}
    for s, part in splits.items():
        if len(part) == 0:
            raise ValueError(f"data set {dataset.name!r}: its {s} split is empty")

    if scheme == "sites":
        missing = [s for s, p in splits.items() if p.site is None]
        if missing:
            raise ValueError(f"scheme 'sites' needs per-image site ids (ImageSet.site), and data "
                             f"set {dataset.name!r} has none in {', '.join(missing)}; use "
                             f"'iid', 'dirichlet' or 'quantity', or data with *_site arrays "
                             "(e.g. the simulated set)")
        ids = np.unique(np.concatenate([p.site for p in splits.values()]))
        _check_site_count(ids, n_institutions)
        plan = [{s: np.flatnonzero(p.site == sid).astype(np.int64) for s, p in splits.items()}
                for sid in ids]
        for sid, inst in zip(ids, plan):
            empty = [s for s in _SPLITS if inst[s].size == 0]
            if empty:
                raise ValueError(f"site {int(sid)} has no images in its {', '.join(empty)} "
                                 "split(s); every institution needs train, val and test images")
            inst["train"] = _take_fraction(inst["train"], splits["train"].labels, fraction, rng)
        small = [int(sid) for sid, inst in zip(ids, plan) if inst["train"].size < min_size]
        if small:
            raise ValueError(f"site(s) {small} would have fewer than min_size={min_size} "
                             f"training images (fraction={fraction}); use a larger fraction or "
                             "a smaller min_size")
        return plan

    n = int(n_institutions)
    n_train = len(splits["train"])
    if n * max(min_size, 1) > n_train:
        raise ValueError(f"more institutions than images: {n_train} training images cannot give "
                         f"{n} institutions at least {max(min_size, 1)} each (min_size="
                         f"{min_size})")
    for s in ("val", "test"):
        if n > len(splits[s]):
            raise ValueError(f"more institutions than images: the {s} split has "
                             f"{len(splits[s])} images for {n} institutions; every institution "
                             f"needs at least one {s} image")
    k = max(int(dataset.n_classes),
            max(int(p.labels.max()) + 1 for p in splits.values()))
    check_class_count(k, max(len(p) for p in splits.values()), f"data set {dataset.name!r}",
                      f"n_classes {dataset.n_classes}, largest label "
                      f"{max(int(p.labels.max()) for p in splits.values())}")
    tries = 1 if scheme == "iid" else MAX_TRIES
    smallest = None
    for _ in range(tries):
        shares = draw_shares(scheme, n, k, rng, alpha=alpha, quantity_sigma=quantity_sigma)
        per_split = {s: partition_indices(p.labels, n, scheme, seed=rng, min_size=0,
                                          n_classes=k, shares=shares)
                     for s, p in splits.items()}
        plan = [{s: per_split[s][i] for s in _SPLITS} for i in range(n)]
        for inst in plan:
            inst["train"] = _take_fraction(inst["train"], splits["train"].labels, fraction, rng)
        sizes = [(inst["train"].size, inst["val"].size, inst["test"].size) for inst in plan]
        if all(tr >= min_size and va >= 1 and te >= 1 for tr, va, te in sizes):
            return plan
        smallest = min(sizes)
    hint = {"dirichlet": "a larger alpha, ", "dirichlet_mix": "a larger alpha, ",
            "quantity": "a smaller quantity_sigma, "}.get(scheme, "")
    note = ""
    if scheme == "dirichlet" and n > k:
        note = (f". With {k} classes for {n} institutions, a small alpha gives each class to about "
                "one institution, so some institutions get almost nothing")
    raise ValueError(
        f"could not draw a {scheme!r} partition of data set {dataset.name!r} into {n} "
        f"institutions in which every institution has at least min_size={min_size} training "
        f"images (after fraction={fraction}) and at least one val and one test image, in {tries} "
        f"draw(s) (smallest train/val/test: {smallest}); use {hint}fewer institutions, a larger "
        f"fraction or a smaller min_size{note}")


def partition(dataset: Dataset, n_institutions: int | None, scheme: str = "iid", *,
              alpha: float = 0.5, quantity_sigma: float = 1.0, fraction: float = 1.0,
              seed: int = 0, min_size: int = 2) -> list[InstitutionData]:
    """Split ``dataset`` among ``n_institutions`` institutions.

    Parameters
    ----------
    scheme: ``"iid"``, ``"dirichlet"``, ``"dirichlet_mix"``, ``"quantity"`` or ``"sites"``
        (module docstring).
    alpha: Dirichlet concentration (> 0), schemes ``"dirichlet"`` and ``"dirichlet_mix"``.
    quantity_sigma: log-normal sigma (>= 0) of institution sizes, scheme ``"quantity"``.
    fraction: in (0, 1]; each institution keeps this fraction of its train split.
    seed: all randomness; same arguments → same partition.
    min_size: the least number of training images per institution (after ``fraction``); random
        schemes are redrawn (at most :data:`MAX_TRIES` times) until it holds, else ValueError.
        Every institution also gets at least one val and one test image.

    Returns
    -------
    One :class:`InstitutionData` per institution (``index`` 0..n-1), images copied.
    """
    plan = partition_plan(dataset, n_institutions, scheme, alpha=alpha,
                          quantity_sigma=quantity_sigma, fraction=fraction, seed=seed,
                          min_size=min_size)
    return [InstitutionData(index=i, train=dataset.train.subset(p["train"]),
                            val=dataset.val.subset(p["val"]), test=dataset.test.subset(p["test"]))
            for i, p in enumerate(plan)]
