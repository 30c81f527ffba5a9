"""Tests of the simulated chest-CT nodule generator (fast: small n, no training)."""
from __future__ import annotations

import numpy as np
import pytest

from medchain.data.simulate import CLASS_NAMES, site_profile, simulate_ct
from medchain.data.types import Dataset

N = 600


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return simulate_ct(n=N, sites=5, seed=0)


@pytest.fixture(scope="module")
def ds_seed1() -> Dataset:
    return simulate_ct(n=N, sites=5, seed=1)


def _splits(d: Dataset):
    return (d.train, d.val, d.test)


def _site_labels(d: Dataset, site: int) -> np.ndarray:
    """All labels of one site, over the three splits."""
    return np.concatenate([s.labels[s.site == site] for s in _splits(d)])


def _air_level(d: Dataset) -> dict[int, tuple[float, float]]:
    """Per site: mean grey value and mean within-image std of the 3x3 image corners (air)."""
    s = d.train
    out = {}
    for site in np.unique(s.site):
        corner = s.images[s.site == site][:, :3, :3].reshape(-1, 9).astype(float)
        out[int(site)] = (corner.mean(), corner.std(axis=1).mean())
    return out


def test_shapes_dtypes_and_metadata(ds):
    assert ds.name == "simulated_ct"
    assert ds.n_classes == 3 and ds.class_names == CLASS_NAMES == ["no nodule", "benign", "malignant"]
    assert ds.source.startswith(f"simulated:n={N},sites=5,seed=0")
    assert ds.image_shape == (28, 28) and ds.n_channels == 1
    assert sum(len(s) for s in _splits(ds)) == N
    for s in _splits(ds):
        assert s.images.dtype == np.uint8 and s.images.shape == (len(s), 28, 28)
        assert s.labels.dtype == np.int64 and s.labels.shape == (len(s),)
        assert s.site.dtype == np.int64 and s.site.shape == (len(s),)
        assert s.labels.min() >= 0 and s.labels.max() < 3
        assert set(np.unique(s.labels)) == {0, 1, 2}
        assert s.images.std() > 10          # not blank


def test_split_fractions_are_stratified_per_site(ds):
    for site in range(5):
        sizes = [int((s.site == site).sum()) for s in _splits(ds)]
        assert sizes == [84, 12, 24]         # 120 images per site, 70 / 10 / 20 %
        for c in range(3):
            per_split = [int(((s.site == site) & (s.labels == c)).sum()) for s in _splits(ds)]
            total = sum(per_split)
            assert abs(per_split[0] - 0.7 * total) <= 1 and abs(per_split[2] - 0.2 * total) <= 1


def test_same_seed_is_byte_identical(ds):
    again = simulate_ct(n=N, sites=5, seed=0)
    for a, b in zip(_splits(ds), _splits(again)):
        assert a.images.tobytes() == b.images.tobytes()
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.site, b.site)


def test_other_seed_differs(ds, ds_seed1):
    assert ds.train.images.tobytes() != ds_seed1.train.images.tobytes()
    assert not np.array_equal(ds.train.labels, ds_seed1.train.labels)


def test_site_ids_honour_site_offset():
    d = simulate_ct(n=300, sites=3, seed=0, site_offset=5)
    for s in _splits(d):
        assert set(np.unique(s.site)) == {5, 6, 7}


def test_site_profile_depends_on_site_id_only():
    assert site_profile(7) == site_profile(7)
    assert site_profile(7) != site_profile(8)
    p = site_profile(3)
    assert p.n_views > 0 and p.dose > 0 and p.window_width > 0
    assert np.isclose(sum(p.class_mix), 1.0)
    with pytest.raises(ValueError, match="site id"):
        site_profile(-1)


def test_same_site_same_scanner_across_seeds():
    # Site 7 is the 3rd site at offset 5 and the 1st at offset 7: its scanner must show the
    # same air level and noise in every data set, whatever the seed and the other sites.
    a = _air_level(simulate_ct(n=300, sites=3, seed=0, site_offset=5))
    b = _air_level(simulate_ct(n=200, sites=2, seed=4, site_offset=7))
    assert abs(a[7][0] - b[7][0]) < 3.0
    assert abs(a[7][1] - b[7][1]) < 0.5 * max(a[7][1], 0.5)


def test_sites_differ_measurably(ds):
    levels = _air_level(ds)
    means = np.array([levels[s][0] for s in range(5)])
    noise = np.array([levels[s][1] for s in range(5)])
    assert means.max() - means.min() > 15.0          # grey levels
    assert noise.max() / max(noise.min(), 0.1) > 2.0
    # also through the whole image: per-site mean brightness spreads well beyond its error
    s = ds.train
    site_means = [s.images[s.site == k].mean() for k in range(5)]
    per_image_sd = s.images.reshape(len(s), -1).mean(axis=1).std()
    assert np.ptp(site_means) > 5 * per_image_sd / np.sqrt(84)


def test_default_label_mix_differs_between_sites(ds):
    fractions = np.array([np.bincount(_site_labels(ds, k), minlength=3) / 120 for k in range(5)])
    assert np.ptp(fractions[:, 0]) > 0.15 and np.ptp(fractions[:, 2]) > 0.15
    for k in range(5):
        assert np.allclose(fractions[k], site_profile(k).class_mix, atol=0.01)


def test_class_probs_sets_per_site_counts():
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    d = simulate_ct(n=200, sites=2, seed=0, class_probs=probs)
    for k in range(2):
        counts = np.bincount(_site_labels(d, k), minlength=3)
        assert counts.tolist() == (probs[k] * 100).astype(int).tolist()


@pytest.mark.parametrize("probs, match", [
    (np.full((4, 3), 1 / 3), "shape"),
    (np.full((5, 2), 0.5), "shape"),
    (np.tile([1.2, -0.1, -0.1], (5, 1)), "non-negative"),
    (np.tile([0.5, 0.3, 0.3], (5, 1)), "sum to 1"),
    (np.tile([np.nan, 0.5, 0.5], (5, 1)), "finite"),
])
def test_class_probs_validation(probs, match):
    with pytest.raises(ValueError, match=match):
        simulate_ct(n=N, sites=5, seed=0, class_probs=probs)


def test_too_small_n_and_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        simulate_ct(n=50, sites=5)
    with pytest.raises(ValueError, match="sites"):
        simulate_ct(n=100, sites=0)
    with pytest.raises(ValueError, match="split"):
        simulate_ct(n=100, sites=1, split=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match="seed"):
        simulate_ct(n=100, sites=1, seed=-1)


def test_other_size_and_uneven_n():
    d = simulate_ct(n=61, sites=3, seed=2, size=16)
    assert d.image_shape == (16, 16)
    assert sum(len(s) for s in _splits(d)) == 61


def test_huge_n_fails_fast_from_a_memory_estimate(monkeypatch):
    """n=10**12 used to hang spawning 2·10**9 seeds; it is refused before any allocation."""
    import time

    from medchain.data import limits
    from medchain.data.simulate import simulation_bytes

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"n=1,000,000,000,000, size=28\) would need about "
                                         r"2\.4 PB of memory.*fewer images") as err:
        simulate_ct(n=10**12)
    assert isinstance(err.value, MemoryError) and time.perf_counter() - t0 < 1.0
    # the estimate scales with n and the image area, and a normal run fits anywhere
    assert 2.3e15 < simulation_bytes(10**12, 28) < 2.5e15
    assert simulation_bytes(10_000, 28) < 1e9
    assert simulation_bytes(1000, 56) > simulation_bytes(1000, 28)
    monkeypatch.setattr(limits, "available_memory", lambda: 10**6)
    with pytest.raises(MemoryError, match="n=100, size=28"):
        simulate_ct(n=100, sites=1)


def test_provenance_hashes_the_generator_parameters(ds, ds_seed1, tmp_path):
    import json

    from medchain.data import data_provenance, load_dataset, save_npz

    p = data_provenance(ds)
    assert p["kind"] == "simulated" and p["sha256_of"] == "generator parameters"
    assert p["generator"] == "medchain.data.simulate.simulate_ct"
    assert p["params"]["n"] == N and p["params"]["seed"] == 0 and p["params"]["sites"] == 5
    assert p["n_total"] == N and p["n_sites"] == 5 and p["n_classes"] == 3
    assert p["image_shape"] == [28, 28] and json.loads(json.dumps(p)) == p
    assert data_provenance(ds_seed1)["sha256"] != p["sha256"]
    # a saved copy: a file hash now, the same content hash
    copy = data_provenance(load_dataset(save_npz(ds, tmp_path / "sim.npz")))
    assert copy["kind"] == "npz" and copy["content_sha256"] == p["content_sha256"]
