"""Tests for medchain.data.partition: splitting a data set among institutions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medchain.data import Dataset, ImageSet, partition, partition_indices, partition_plan
from medchain.data.partition import SCHEMES, draw_shares

SHARED_MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"

SPLITS = ("train", "val", "test")


def _split(n: int, k: int, rng: np.random.Generator, start: int, probs=None,
           sites: int | None = None) -> ImageSet:
    labels = rng.choice(k, size=n, p=probs).astype(np.int64)
    ids = np.arange(start, start + n)
    # Every image encodes its own global id in its first two pixels: tests can tell images apart.
    images = np.zeros((n, 4, 4), dtype=np.uint8)
    images[:, 0, 0] = ids // 256
    images[:, 0, 1] = ids % 256
    site = None if sites is None else (np.arange(n) % sites).astype(np.int64)
    return ImageSet(images, labels, site)


def make_ds(n=(600, 100, 200), k=3, sites=None, seed=0, probs=None) -> Dataset:
    rng = np.random.default_rng(seed)
    parts, start = [], 0
    for m in n:
        parts.append(_split(m, k, rng, start, probs, sites))
        start += m
    return Dataset("toy", *parts, n_classes=k, class_names=[f"c{i}" for i in range(k)],
                   source="test")


def ids_of(s: ImageSet) -> np.ndarray:
    return s.images[:, 0, 0].astype(np.int64) * 256 + s.images[:, 0, 1]


def check_disjoint(ds: Dataset, insts, full: bool = True) -> None:
    for s in SPLITS:
        all_ids = ids_of(getattr(ds, s))
        got = np.concatenate([ids_of(getattr(i, s)) for i in insts])
        assert len(np.unique(got)) == len(got), f"an image of {s} is given twice"
        assert set(got) <= set(all_ids)
        if full:
            assert len(got) == len(all_ids), f"{s}: not every image is used"
        for inst in insts:  # labels travel with their images
            part = getattr(inst, s)
            src = getattr(ds, s)
            assert np.array_equal(src.labels[ids_of(part) - ids_of(src)[0]], part.labels)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "dirichlet_mix", "quantity"])
def test_schemes_cover_all_images_once_and_are_deterministic(scheme):
    ds = make_ds()
    a = partition(ds, 4, scheme, seed=3)
    assert [i.index for i in a] == [0, 1, 2, 3]
    check_disjoint(ds, a)
    b = partition(ds, 4, scheme, seed=3)
    for x, y in zip(a, b):
        for s in SPLITS:
            assert np.array_equal(getattr(x, s).images, getattr(y, s).images)
            assert np.array_equal(getattr(x, s).labels, getattr(y, s).labels)
    c = partition(ds, 4, scheme, seed=4)
    assert any(not np.array_equal(ids_of(x.train), ids_of(y.train)) for x, y in zip(a, c))


def test_iid_is_balanced_in_size_and_label_mix():
    ds = make_ds(n=(601, 97, 203))
    insts = partition(ds, 5, "iid", seed=0)
    for s in SPLITS:
        sizes = [len(getattr(i, s)) for i in insts]
        assert max(sizes) - min(sizes) <= 1, (s, sizes)
        per_class = np.array([np.bincount(getattr(i, s).labels, minlength=3) for i in insts])
        assert (per_class.max(0) - per_class.min(0) <= 1).all()


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet_mix"])
def test_dirichlet_skews_labels_and_keeps_each_institutions_mix_across_splits(scheme):
    ds = make_ds(n=(3000, 1000, 2000), k=4)
    skewed = partition(ds, 5, scheme, alpha=0.1, seed=0, min_size=2)
    near_iid = partition(ds, 5, scheme, alpha=1000.0, seed=0)

    def top_share(insts):
        return np.mean([np.bincount(i.train.labels, minlength=4).max() / len(i.train)
                        for i in insts])

    assert top_share(skewed) > 0.5
    assert top_share(near_iid) < 0.35
    for inst in skewed:  # the test split follows the institution's own label mix
        if len(inst.test) >= 50:
            p_tr = np.bincount(inst.train.labels, minlength=4) / len(inst.train)
            p_te = np.bincount(inst.test.labels, minlength=4) / len(inst.test)
            assert 0.5 * np.abs(p_tr - p_te).sum() < 0.1


def test_quantity_varies_sizes_with_iid_labels_and_sigma_zero_is_equal():
    ds = make_ds(n=(3000, 600, 1200))
    insts = partition(ds, 5, "quantity", quantity_sigma=1.0, seed=1)
    sizes = np.array([len(i.train) for i in insts])
    assert sizes.max() > 2 * sizes.min()
    test_sizes = np.array([len(i.test) for i in insts])
    assert np.corrcoef(sizes, test_sizes)[0, 1] > 0.99  # one size draw for every split
    pooled = np.bincount(ds.train.labels, minlength=3) / len(ds.train)
    for inst in insts:
        if len(inst.train) > 200:
            mix = np.bincount(inst.train.labels, minlength=3) / len(inst.train)
            assert np.abs(mix - pooled).max() < 0.02
    equal = partition(ds, 5, "quantity", quantity_sigma=0.0, seed=1)
    assert max(len(i.train) for i in equal) - min(len(i.train) for i in equal) <= 3


def test_sites_scheme_gives_one_institution_per_site():
    ds = make_ds(sites=3)
    for s in SPLITS:  # sites 5, 7, 9: institution i is the i-th distinct id
        getattr(ds, s).site = getattr(ds, s).site * 2 + 5
    insts = partition(ds, None, "sites")
    assert len(insts) == 3
    check_disjoint(ds, insts)
    for i, sid in enumerate([5, 7, 9]):
        for s in SPLITS:
            assert (getattr(insts[i], s).site == sid).all()
    assert len(partition(ds, 3, "sites")) == 3
    with pytest.raises(ValueError, match="n_institutions must be 3 or None"):
        partition(ds, 4, "sites")


def test_sites_scheme_needs_site_ids():
    with pytest.raises(ValueError, match="needs per-image site ids"):
        partition(make_ds(), None, "sites")


def test_fraction_keeps_a_stratified_share_of_train_only():
    ds = make_ds(n=(1000, 100, 200))
    full = partition(ds, 4, "iid", seed=2)
    few = partition(ds, 4, "iid", seed=2, fraction=0.1)
    for a, b in zip(full, few):
        assert len(b.train) == round(0.1 * len(a.train))
        assert set(ids_of(b.train)) <= set(ids_of(a.train))
        assert set(b.train.labels) == set(a.train.labels)  # every class it has is kept
        assert np.array_equal(ids_of(a.val), ids_of(b.val))
        assert np.array_equal(ids_of(a.test), ids_of(b.test))
    check_disjoint(ds, few, full=False)


def test_fraction_keeps_one_image_per_class_when_rounding_would_drop_it():
    ds = make_ds(n=(400, 60, 60), k=3, probs=[0.9, 0.07, 0.03])
    insts = partition(ds, 2, "iid", seed=0, fraction=0.05)
    for inst in insts:
        assert set(inst.train.labels) == {0, 1, 2}
        assert len(inst.train) == 10  # round(0.05 * 200)


def test_min_size_redraws_then_fails_clearly():
    ds = make_ds(n=(60, 30, 30), k=3)
    insts = partition(ds, 6, "dirichlet_mix", alpha=0.05, seed=0, min_size=3)
    assert min(len(i.train) for i in insts) >= 3
    with pytest.raises(ValueError, match=r"min_size=10 .* draw"):
        partition(ds, 6, "dirichlet_mix", alpha=0.01, seed=0, min_size=10)
    # per-class convention: 3 classes cannot feed 6 institutions at a tiny alpha (flwr-datasets'
    # DirichletPartitioner raises likewise); a moderate alpha is redrawn until min_size holds
    with pytest.raises(ValueError, match=r"(?s)min_size=3 .* 100 draw.*3 classes for 6 "
                                         r"institutions"):
        partition(ds, 6, "dirichlet", alpha=0.01, seed=0, min_size=3)
    insts = partition(ds, 6, "dirichlet", alpha=1.0, seed=0, min_size=3)
    assert min(len(i.train) for i in insts) >= 3
    assert min(min(len(i.val), len(i.test)) for i in insts) >= 1
    with pytest.raises(ValueError, match="min_size=2"):
        partition(ds, 6, "iid", fraction=0.02, min_size=2)


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(n_institutions=0), "n_institutions must be >= 1"),
    (dict(n_institutions=-2), "n_institutions must be >= 1"),
    (dict(n_institutions=True), "n_institutions must be an integer"),
    (dict(n_institutions=None), "n_institutions is required"),
    (dict(scheme="dirichlet", alpha=0.0), "alpha"),
    (dict(scheme="dirichlet", alpha=-1.0), "alpha"),
    (dict(scheme="quantity", quantity_sigma=-0.5), "quantity_sigma"),
    (dict(fraction=0.0), "fraction must be in"),
    (dict(fraction=1.5), "fraction must be in"),
    (dict(min_size=-1), "min_size"),
    (dict(scheme="label-skew"), "valid schemes: iid, dirichlet, dirichlet_mix, quantity, sites"),
    (dict(scheme="dirichlet_mix", alpha=float("nan")), "alpha"),
    (dict(n_institutions=40), "more institutions than images"),
    (dict(n_institutions=21, min_size=1), "more institutions than images: the val split"),
    (dict(n_institutions=20, min_size=3), "more institutions than images"),
])
def test_bad_arguments(kwargs, phrase):
    ds = make_ds(n=(50, 20, 30))
    args = dict(n_institutions=3, scheme="iid")
    args.update(kwargs)
    with pytest.raises(ValueError, match=phrase):
        partition(ds, args.pop("n_institutions"), args.pop("scheme"), **args)


def test_partition_indices_plain_arrays():
    y = np.repeat(np.arange(3), [50, 30, 20])
    parts = partition_indices(y, 4, "iid", seed=0)
    assert all(p.dtype == np.int64 for p in parts)
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(100))
    assert [len(p) for p in parts] == [25, 25, 25, 25]
    again = partition_indices(y, 4, "iid", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    d = partition_indices(y, 4, "dirichlet", alpha=0.3, seed=1, min_size=5)
    assert np.array_equal(np.sort(np.concatenate(d)), np.arange(100))
    assert min(len(p) for p in d) >= 5
    sites = np.arange(100) % 3
    s = partition_indices(y, None, "sites", sites=sites)
    assert [np.unique(sites[p]).tolist() for p in s] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="needs per-image site ids"):
        partition_indices(y, None, "sites")
    with pytest.raises(ValueError, match="valid schemes"):
        partition_indices(y, 2, "nope")


def test_shares_are_column_stochastic():
    rng = np.random.default_rng(0)
    for scheme in ("iid", "dirichlet", "dirichlet_mix", "quantity"):
        p = draw_shares(scheme, 5, 4, rng, alpha=0.05)
        assert p.shape == (5, 4)
        assert np.allclose(p.sum(0), 1.0)
        assert (p >= 0).all()
    assert set(SCHEMES) == {"iid", "dirichlet", "dirichlet_mix", "quantity", "sites"}
    assert np.allclose(draw_shares("dirichlet", 1, 3, rng, alpha=0.1), 1.0)


def _class_shares(scheme: str, alpha: float, n_inst: int, k: int, per_class: int,
                  draws: int) -> np.ndarray:
    """(draws, n_inst, k): the share of each class's images each institution received, over
    independent partitions (min_size=0: no redraw, so nothing conditions the draws)."""
    y = np.repeat(np.arange(k), per_class)
    out = np.empty((draws, n_inst, k))
    for d in range(draws):
        parts = partition_indices(y, n_inst, scheme, alpha=alpha, seed=d, min_size=0)
        out[d] = [np.bincount(y[p], minlength=k) / per_class for p in parts]
    return out


@pytest.mark.parametrize("alpha", [0.1, 0.5, 2.0])
def test_dirichlet_reproduces_the_per_class_convention_statistics(alpha):
    """Hsu et al. 2019 / flwr-datasets: each class's shares over n institutions ~ Dir(alpha 1_n),
    so each share is Beta(alpha, (n-1) alpha): mean 1/n, variance (1/n)(1-1/n)/(n alpha + 1)."""
    stats = pytest.importorskip("scipy.stats")
    n, k = 5, 4
    shares = _class_shares("dirichlet", alpha, n, k, per_class=2000, draws=300)
    var = (1 / n) * (1 - 1 / n) / (n * alpha + 1)
    # per institution (not trivially 1/n: the shares of one class sum to 1 over institutions)
    assert np.abs(shares.mean(axis=(0, 2)) - 1 / n).max() < 0.025
    assert abs(shares.var() / var - 1) < 0.1
    # the whole marginal: Beta(alpha, (n-1) alpha), compared at points well above the 1/2000
    # rounding of the counts (1200 independent samples: 0.04 is about 3 standard errors)
    x = shares[:, 0, :].ravel()
    for q in (0.01, 0.05, 0.1, 0.2, 0.4, 0.7):
        assert abs((x <= q).mean() - stats.beta(alpha, (n - 1) * alpha).cdf(q)) < 0.04, q
    # the earlier per-institution label-mix draw ("dirichlet_mix") has another variance: its
    # alpha was not the published one
    old = _class_shares("dirichlet_mix", alpha, n, k, per_class=2000, draws=300)
    assert old.var() < 0.85 * var


def test_small_alpha_gives_institutions_dominated_by_few_classes():
    k, n = 10, 5
    ds = make_ds(n=(5000, 1000, 2000), k=k)

    def top2(insts):
        return np.mean([np.sort(np.bincount(i.train.labels, minlength=k))[-2:].sum()
                        / len(i.train) for i in insts])

    skewed = partition(ds, n, "dirichlet", alpha=0.1, seed=1)
    near_iid = partition(ds, n, "dirichlet", alpha=100.0, seed=1)
    assert top2(skewed) > 0.6   # about two classes per institution
    assert top2(near_iid) < 0.3  # IID: 2 / 10 classes
    # every class is spread over few institutions: its largest holder has most of it
    y = ds.train.labels
    holder = [max((np.asarray(i.train.labels) == c).sum() for i in skewed) / (y == c).sum()
              for c in range(k)]
    assert np.mean(holder) > 0.6


def test_dirichlet_mix_reproduces_the_earlier_dirichlet_partition():
    """Counts pinned from medchain's former ``"dirichlet"`` (commit f05e7d3), same seed."""
    def split(n, k=4):
        return ImageSet(np.zeros((n, 4, 4), np.uint8), ((np.arange(n) * 7919) % k).astype(np.int64))

    ds = Dataset("pin", split(1200), split(200), split(400), n_classes=4)
    plan = partition_plan(ds, 4, "dirichlet_mix", alpha=0.5, seed=7)
    assert [np.bincount(ds.train.labels[p["train"]], minlength=4).tolist() for p in plan] == \
        [[55, 235, 59, 0], [108, 24, 38, 73], [2, 0, 102, 227], [135, 41, 101, 0]]
    assert [[len(p["val"]), len(p["test"])] for p in plan] == \
        [[58, 115], [40, 81], [55, 111], [47, 93]]


def test_plan_indices_match_partition():
    ds = make_ds()
    plan = partition_plan(ds, 3, "dirichlet", seed=5)
    insts = partition(ds, 3, "dirichlet", seed=5)
    for p, inst in zip(plan, insts):
        for s in SPLITS:
            assert np.array_equal(getattr(ds, s).subset(p[s]).labels, getattr(inst, s).labels)


def test_partition_of_real_breastmnist():
    path = SHARED_MEDMNIST / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"real BreastMNIST not found at {path} (only in the development workspace)")
    from medchain.data import load_dataset

    ds = load_dataset(path)
    insts = partition(ds, 5, "dirichlet", alpha=0.5, seed=0)
    assert sum(len(i.train) for i in insts) == 546
    assert sum(len(i.test) for i in insts) == 156
    assert all(len(i.val) >= 1 for i in insts)


def test_partition_of_simulated_sites():
    simulate = pytest.importorskip("medchain.data.simulate")
    ds = simulate.simulate_ct(n=90, sites=3, seed=0)
    insts = partition(ds, None, "sites")
    assert len(insts) == 3
    assert sum(len(i.train) for i in insts) == len(ds.train)
