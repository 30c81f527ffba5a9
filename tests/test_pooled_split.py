"""Claim 4's institutions: the official splits pooled, partitioned by the heterogeneity rule, and
every institution's share split (stratified) into its own test / val / train."""
from __future__ import annotations

import numpy as np
import pytest

from medchain.data.pooled import partition_pooled, pool, split_report, stratified_take
from medchain.data.types import Dataset, ImageSet


def _ids(images: np.ndarray) -> np.ndarray:
    """The image id written into the first two pixels of each toy image."""
    return images[:, 0, 0].astype(np.int64) * 256 + images[:, 0, 1]


def _dataset(n=(900, 150, 250), k=3, sites=None, seed=0) -> Dataset:
    """Toy images that carry their own id, skewed labels (class c with weight c + 1), optional sites."""
    rng = np.random.default_rng(seed)
    total = sum(n)
    ids = np.arange(total)
    images = np.zeros((total, 4, 4), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
    labels = rng.choice(k, size=total, p=np.arange(1, k + 1) / np.arange(1, k + 1).sum()).astype(np.int64)
    site = None if sites is None else rng.integers(0, sites, total).astype(np.int64)
    cut = np.cumsum(n)[:-1]
    parts = [ImageSet(images[a], labels[a], None if site is None else site[a]) for a in np.split(ids, cut)]
    return Dataset("toy", *parts, n_classes=k)


def test_every_image_once_sizes_and_own_label_mix():
    ds = _dataset()
    insts = partition_pooled(ds, 4, "dirichlet", alpha=1.0, test_per_institution=60, seed=3)
    seen = np.concatenate([_ids(getattr(i, s).images) for i in insts for s in ("train", "val", "test")])
    assert np.array_equal(np.sort(seen), np.arange(1300))          # every pooled image, each once
    for inst in insts:
        share = np.concatenate([getattr(inst, s).labels for s in ("train", "val", "test")])
        n_test = min(60, share.size // 2)
        assert len(inst.test) == n_test
        rest = share.size - n_test
        assert len(inst.val) == pytest.approx(0.2 * rest, abs=1)
        # stratified: each class in the test set in its share's proportion (±1 image)
        counts = np.bincount(share, minlength=3)
        want = n_test * counts / share.size
        np.testing.assert_allclose(np.bincount(inst.test.labels, minlength=3), want, atol=1.0)
        np.testing.assert_allclose(np.bincount(inst.val.labels, minlength=3),
                                   len(inst.val) * counts / share.size, atol=1.5)
    # the institutions' label mixes differ (Dirichlet), so their test mixes differ too
    mixes = np.array([np.bincount(i.test.labels, minlength=3) / len(i.test) for i in insts])
    assert np.ptp(mixes, axis=0).max() > 0.1
    # labels stay with their images: the id → label map of the pooled set is kept
    pooled = pool(ds)
    for inst in insts:
        np.testing.assert_array_equal(pooled.labels[_ids(inst.test.images)], inst.test.labels)


def test_deterministic_by_seed():
    ds = _dataset()
    a = partition_pooled(ds, 3, "quantity", seed=1)
    b = partition_pooled(ds, 3, "quantity", seed=1)
    c = partition_pooled(ds, 3, "quantity", seed=2)
    assert all(np.array_equal(x.test.images, y.test.images) for x, y in zip(a, b))
    assert any(not np.array_equal(_ids(x.test.images), _ids(y.test.images)) for x, y in zip(a, c))


def test_small_shares_get_smaller_test_sets_and_are_reported():
    ds = _dataset()
    insts = partition_pooled(ds, 3, "quantity", quantity_sigma=1.5, test_per_institution=300, seed=0)
    totals = [sum(len(getattr(i, s)) for s in ("train", "val", "test")) for i in insts]
    assert [len(i.test) for i in insts] == [min(300, t // 2) for t in totals]
    rep = split_report(insts, 3, 300)
    assert rep["n_test"] == [len(i.test) for i in insts]
    assert rep["test_below_target"] == [i.index for i in insts if len(i.test) < 300]
    assert rep["test_below_target"]                                 # 1300 images cannot give 3 × 300 × 2
    assert [sum(c) for c in rep["test_label_counts"]] == rep["n_test"]
    assert split_report(insts, 3, None)["test_below_target"] == []


def test_sites_pool_every_split_of_a_site():
    ds = _dataset(sites=4)
    insts = partition_pooled(ds, None, "sites", test_per_institution=50, seed=0)
    pooled = pool(ds)
    assert len(insts) == 4
    for sid, inst in enumerate(insts):
        ids = np.concatenate([_ids(getattr(inst, s).images) for s in ("train", "val", "test")])
        assert np.array_equal(np.sort(ids), np.flatnonzero(pooled.site == sid))
        assert len(inst.test) == 50 and set(inst.test.site) == {sid}


def test_stratified_take_keeps_single_image_classes_for_training():
    labels = np.array([0] * 10 + [1] * 10 + [2])
    idx = np.arange(labels.size)
    taken, rest = stratified_take(idx, labels, 6, np.random.default_rng(0))
    assert taken.size == 6 and 20 in rest and np.intersect1d(taken, rest).size == 0
    assert np.array_equal(np.sort(np.concatenate([taken, rest])), idx)
    assert np.bincount(labels[taken], minlength=3).tolist() == [3, 3, 0]
    # too few to stratify: still the right size, disjoint
    taken, rest = stratified_take(idx, labels, 1, np.random.default_rng(0))
    assert taken.size == 1 and rest.size == 20
    with pytest.raises(ValueError, match="cannot take"):
        stratified_take(idx, labels, 22, np.random.default_rng(0))


@pytest.mark.parametrize("kw, match", [
    ({"test_per_institution": 0}, "test_per_institution"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"max_test_fraction": 0.0}, "max_test_fraction"),
    ({"min_size": 2}, "min_size"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        partition_pooled(_dataset(), 3, "iid", **kw)


def test_sites_without_site_ids_and_too_many_institutions_are_refused():
    with pytest.raises(ValueError, match="site ids"):
        partition_pooled(_dataset(), None, "sites")
    with pytest.raises(ValueError, match="fewer institutions"):
        partition_pooled(_dataset(n=(60, 10, 10)), 4, "dirichlet", alpha=0.05, min_size=15)
