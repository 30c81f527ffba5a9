"""Institutions whose own test sets are large enough to decide something (claim 4).

:func:`medchain.data.partition` cuts each official split (train / val / test) among the
institutions, so an institution's test set is its share of the official test split — 20 to 40
images on BreastMNIST, too few to tell two models apart. :func:`partition_pooled` instead

1. pools the official train, val and test splits (every image once);
2. partitions the pool among the institutions by the heterogeneity rule
   (:func:`medchain.data.partition_indices`: ``"dirichlet"``, ``"quantity"``, ``"sites"``, ...),
   redrawing a random rule until every institution holds at least ``min_size`` images;
3. splits every institution's share, stratified by label (scikit-learn
   ``train_test_split(stratify=...)``), into its own test set of
   ``min(test_per_institution, floor(max_test_fraction × share))`` images, then the rest into
   val (``val_fraction`` of it) and train.

So each institution's test set follows its own label mix, and no image is in two institutions or
two splits. Where an institution holds fewer than ``test_per_institution / max_test_fraction``
images its test set is smaller than ``test_per_institution``; :func:`split_report` says which.
Stratification needs two images of a class: a class with one image in an institution's share goes
to its train split; a split too small to hold one image of every class is drawn unstratified.
"""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from .partition import _rng, partition_indices
from .types import Dataset, ImageSet, InstitutionData

__all__ = ["partition_pooled", "pool", "split_report", "stratified_take"]


def pool(dataset: Dataset) -> ImageSet:
    """The official train, val and test splits of `dataset` in one set (in that order)."""
    return ImageSet.concat([dataset.train, dataset.val, dataset.test])


def stratified_take(idx: np.ndarray, labels: np.ndarray, n_take: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split the indices `idx` into (taken, rest), ``len(taken) == n_take``, stratified on
    ``labels[idx]``; both sorted int64. Classes with one image stay in ``rest``; when `n_take` or
    the rest cannot hold one image of every class the draw is unstratified (still random)."""
    idx = np.asarray(idx, dtype=np.int64)
    if not 0 <= n_take <= idx.size:
        raise ValueError(f"cannot take {n_take} of {idx.size} images")
    if n_take == 0:
        return np.zeros(0, np.int64), np.sort(idx)
    y = labels[idx]
    classes, counts = np.unique(y, return_counts=True)
    single = np.isin(y, classes[counts == 1])
    pool_idx, pool_y = idx[~single], y[~single]
    if n_take > pool_idx.size:      # single-class images must be taken too
        pool_idx, pool_y, single = idx, y, np.zeros_like(single)
    counts = np.unique(pool_y, return_counts=True)[1]
    k = counts.size
    strat = pool_y if k > 1 and counts.min() >= 2 and k <= n_take <= pool_idx.size - k else None
    seed = int(rng.integers(2**31 - 1))
    if n_take == pool_idx.size:
        taken, rest = pool_idx, np.zeros(0, np.int64)
    else:
        rest, taken = train_test_split(pool_idx, test_size=n_take, stratify=strat, random_state=seed)
    return np.sort(taken).astype(np.int64), np.sort(np.concatenate([rest, idx[single]])).astype(np.int64)


def partition_pooled(dataset: Dataset, n_institutions: int | None, scheme: str = "iid", *,
                     test_per_institution: int = 100, val_fraction: float = 0.2,
                     max_test_fraction: float = 0.5, alpha: float = 0.5, quantity_sigma: float = 1.0,
                     seed=0, min_size: int = 20) -> list[InstitutionData]:
    """Partition the pooled data of `dataset` among institutions (see the module docstring).

    test_per_institution: the test images each institution gets where its share allows (>= 1).
    val_fraction: in (0, 1), the share of the non-test images that go to val.
    max_test_fraction: in (0, 1), the largest share of an institution's images used for test.
    min_size: the least number of pooled images per institution (>= 4), a random scheme is
      redrawn until it holds (:data:`medchain.data.partition.MAX_TRIES` draws, then ValueError).
    seed: int or numpy Generator; the same arguments give the same split.
    Returns one :class:`InstitutionData` per institution (index 0..n-1), images copied.
    """
    if isinstance(test_per_institution, bool) or not isinstance(test_per_institution, (int, np.integer)) \
            or test_per_institution < 1:
        raise ValueError(f"test_per_institution must be an integer >= 1, got {test_per_institution!r}")
    for name, v in (("val_fraction", val_fraction), ("max_test_fraction", max_test_fraction)):
        if not (np.isfinite(v) and 0 < v < 1):
            raise ValueError(f"{name} must be in (0, 1), got {v}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 4:
        raise ValueError(f"min_size must be an integer >= 4 (an institution needs train, val and test "
                         f"images), got {min_size!r}")
    rng = _rng(seed)
    data = pool(dataset)
    if scheme == "sites" and data.site is None:
        raise ValueError(f"scheme 'sites' needs per-image site ids, and data set {dataset.name!r} has "
                         "none; use 'iid', 'dirichlet' or 'quantity', or data with *_site arrays")
    shares = partition_indices(data.labels, n_institutions, scheme, alpha=alpha, quantity_sigma=quantity_sigma,
                               seed=rng, min_size=min_size, sites=data.site, n_classes=dataset.n_classes)
    out = []
    for i, idx in enumerate(shares):
        # at least one test image; at least one val and two train images left
        n_test = max(1, min(int(test_per_institution), int(np.floor(max_test_fraction * idx.size)), idx.size - 3))
        test, rest = stratified_take(idx, data.labels, n_test, rng)
        n_val = min(rest.size - 2, max(1, int(round(val_fraction * rest.size))))
        val, train = stratified_take(rest, data.labels, n_val, rng)
        out.append(InstitutionData(index=i, train=data.subset(train), val=data.subset(val), test=data.subset(test)))
    return out


def split_report(insts: list[InstitutionData], n_classes: int, test_per_institution: int | None) -> dict:
    """What the institutions' splits hold, for summary.json: per institution the train / val /
    test sizes and test class counts, and ``test_below_target``: the institutions whose test set
    is smaller than `test_per_institution` (their share of the data was too small)."""
    sizes = {s: [len(getattr(i, s)) for i in insts] for s in ("train", "val", "test")}
    return {"n_train": sizes["train"], "n_val": sizes["val"], "n_test": sizes["test"],
            "test_per_institution": test_per_institution,
            "test_label_counts": [np.bincount(i.test.labels, minlength=n_classes).tolist() for i in insts],
            "test_below_target": [i.index for i in insts
                                  if test_per_institution is not None and len(i.test) < test_per_institution]}
