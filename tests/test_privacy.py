"""medchain.privacy (partial update, Shokri & Shmatikov) and exact sparse aggregation, on
hand-computed cases."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medchain import codec
from medchain.aggregation import SparseUpdate, aggregate, weighted_mean
from medchain.params import Layout, LayoutEntry
from medchain.privacy import (apply_download, download_mask, make_selector, n_selected,
                              select_update)

D = np.array([0.1, -0.5, 0.3, 0.0, -0.3, 0.2], dtype=np.float32)


def two_tensor_layout() -> Layout:
    return Layout((LayoutEntry("a.weight", (4,), "param", "Linear"),
                   LayoutEntry("b.weight", (2, 2), "param", "Linear")))


# ------------------------------------------------------------------------------ selection

def test_n_selected_rounds_half_up_and_keeps_one():
    assert n_selected(0.1, 30) == 3            # 0.1*30 = 3.0000000000000004 in floats
    assert n_selected(0.5, 5) == 3             # 2.5 rounds up
    assert n_selected(0.001, 100) == 1         # never zero
    assert n_selected(1.0, 7) == 7
    assert n_selected(0.25, 0) == 0


def test_largest_rule_by_hand_with_stable_ties():
    idx, vals = select_update(D, 0.5)          # k = 3: |-0.5|, |0.3|, |-0.3|
    assert idx.dtype == np.int64 and vals.dtype == np.float32
    assert idx.tolist() == [1, 2, 4]
    assert vals.tolist() == pytest.approx([-0.5, 0.3, -0.3])
    idx, _ = select_update(D, 2 / 6)            # k = 2: tie 0.3 vs -0.3 -> lower index (2) wins
    assert idx.tolist() == [1, 2]
    idx, vals = select_update(D, 1.0)
    assert idx.tolist() == list(range(6)) and np.array_equal(vals, D)


def test_clipping_after_selection():
    idx, vals = select_update(D, 0.5, gamma=0.25)
    assert idx.tolist() == [1, 2, 4]            # selected on unclipped magnitudes
    assert vals.tolist() == [-0.25, 0.25, -0.25]


def test_threshold_tau_limits_eligibility():
    idx, _ = select_update(D, 1.0, tau=0.25)   # strictly above 0.25
    assert idx.tolist() == [1, 2, 4]
    idx, _ = select_update(D, 1.0, tau=0.5)    # nothing is strictly above 0.5
    assert idx.size == 0
    idx, _ = select_update(D, 1.0, rule="random", tau=0.15, rng=0)
    assert idx.tolist() == [1, 2, 4, 5]


def test_random_rule_is_seeded_and_within_eligible():
    rng_delta = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    a = select_update(rng_delta, 0.1, rule="random", rng=7)
    b = select_update(rng_delta, 0.1, rule="random", rng=np.random.default_rng(7))
    c = select_update(rng_delta, 0.1, rule="random", rng=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].size == 100 and np.all(np.diff(a[0]) > 0)
    assert np.array_equal(a[1], rng_delta[a[0]])
    top = select_update(rng_delta, 0.1)[0]
    assert not np.array_equal(a[0], top)       # random is not the top-k
    with pytest.raises(ValueError, match="rng"):
        select_update(rng_delta, 0.1, rule="random")


def test_noise_is_deterministic_and_has_the_given_scale():
    delta = np.zeros(20_000, dtype=np.float32)
    i1, v1 = select_update(delta, 1.0, sigma=0.5, rng=3)
    i2, v2 = select_update(delta, 1.0, sigma=0.5, rng=3)
    _, v3 = select_update(delta, 1.0, sigma=0.5, rng=4)
    assert np.array_equal(v1, v2) and not np.array_equal(v1, v3)
    assert np.std(v1) == pytest.approx(0.5, rel=0.03)
    # noise is added after clipping: clipped values +- noise
    idx, vals = select_update(D, 0.5, gamma=0.25, sigma=1e-3, rng=0)
    assert np.allclose(vals, [-0.25, 0.25, -0.25], atol=5e-3)
    with pytest.raises(ValueError, match="rng"):
        select_update(D, 0.5, sigma=0.1)


def test_per_layer_versus_global_topk():
    layout = two_tensor_layout()
    delta = np.array([5, -6, 7, 8, 0.1, -0.2, 0.3, -0.4], dtype=np.float32)
    g_idx, _ = select_update(delta, 0.5, layout=layout)                   # global: 4 largest
    l_idx, l_vals = select_update(delta, 0.5, scope="layer", layout=layout)  # 2 per tensor
    assert g_idx.tolist() == [0, 1, 2, 3]
    assert l_idx.tolist() == [2, 3, 6, 7]
    assert l_vals.tolist() == pytest.approx([7, 8, 0.3, -0.4])
    # every tensor shares at least one coordinate in layer scope
    assert select_update(delta, 0.01, scope="layer", layout=layout)[0].tolist() == [3, 7]
    assert select_update(delta, 0.01, layout=layout)[0].tolist() == [3]
    with pytest.raises(ValueError, match="layout"):
        select_update(delta, 0.5, scope="layer")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="theta_u"):
        select_update(D, 0.0)
    with pytest.raises(ValueError, match="theta_u"):
        select_update(D, 1.5)
    with pytest.raises(ValueError, match="rule"):
        select_update(D, 0.5, rule="smallest")
    with pytest.raises(ValueError, match="scope"):
        select_update(D, 0.5, scope="tensor")
    with pytest.raises(ValueError, match="NaN"):
        select_update(np.array([1.0, np.nan], dtype=np.float32), 0.5)
    with pytest.raises(ValueError, match="gamma"):
        select_update(D, 0.5, gamma=0.0)


def test_selection_encodes_and_decodes_exactly():
    layout = two_tensor_layout()
    delta = np.linspace(-1, 1, 8).astype(np.float32)
    idx, vals = select_update(delta, 0.25, layout=layout)
    payload = codec.encode_update(vals, layout.layout_id, indices=idx, total_size=layout.size)
    dec = codec.decode_update(payload, expected_layout_id=layout.layout_id, expected_size=8)
    assert np.array_equal(dec.indices, idx) and np.array_equal(dec.values, vals)


# ------------------------------------------------------------------------------ the hook

def test_make_selector_seeds_per_round_and_institution():
    layout = two_tensor_layout()
    cfg = SimpleNamespace(theta_u=0.5, select_rule="random")
    delta = np.arange(1, 9, dtype=np.float32)
    s0 = make_selector(cfg, layout, seed=1, institution=0)
    s0b = make_selector(cfg, layout, seed=1, institution=0)
    s1 = make_selector(cfg, layout, seed=1, institution=1)
    picks = {tuple(s0(delta, r)[0]) for r in range(8)}
    assert len(picks) > 1                                       # changes with the round
    for r in range(4):
        assert np.array_equal(s0(delta, r)[0], s0b(delta, r)[0])  # reproducible
    assert any(not np.array_equal(s0(delta, r)[0], s1(delta, r)[0]) for r in range(4))
    assert s0.options["rule"] == "random" and s0.options["theta_u"] == 0.5
    # dict params and overrides; default rule largest
    top = make_selector({"theta_u": 0.25}, layout)
    assert top(delta, 0)[0].tolist() == [6, 7]
    assert make_selector({"theta_u": 0.25}, layout, scope="layer")(delta, 0)[0].tolist() == [3, 7]
    with pytest.raises(TypeError, match="unknown"):
        make_selector({"theta_u": 0.25}, layout, theta=0.1)
    with pytest.raises(ValueError, match="shape"):
        top(np.zeros(3, np.float32), 0)


def test_make_selector_as_institution_hook():
    """The hook plugs into Institution.upload: what goes on the ledger is the selection."""
    from medchain.data.types import ImageSet, InstitutionData
    from medchain.protocol import CollabConfig, Institution, MemoryLedger
    img = np.zeros((4, 28, 28), np.uint8)
    data = InstitutionData(0, ImageSet(img, np.array([0, 1, 0, 1])), ImageSet(img, np.zeros(4, np.int64)),
                           ImageSet(img, np.zeros(4, np.int64)))
    cfg = CollabConfig(rounds=1, theta_u=0.1, model="lenet")
    ledger = MemoryLedger(b"\0" * 32, 1)
    probe = Institution(data, 2, cfg, ledger.as_account("probe"))
    sel = make_selector(cfg, probe.layout, seed=0, institution=0)
    inst = Institution(data, 2, cfg, ledger.as_account("i0"), select=sel)
    delta = np.random.default_rng(0).normal(size=inst.layout.size).astype(np.float32)
    inst.upload(0, delta)
    idx, vals = inst.last_upload
    assert idx.size == n_selected(0.1, inst.layout.size)
    rec = inst.ledger.updates(0)[0]
    dec = codec.decode_update(rec.payload, expected_layout_id=inst.layout.layout_id)
    assert np.array_equal(dec.indices, idx) and np.array_equal(dec.values, delta[idx])


# ------------------------------------------------------------------------------ download

def test_download_mask_by_hand_and_apply():
    old = np.array([0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
    new = np.array([0.5, -2.0, 0.1, 2.0, -0.5], dtype=np.float32)
    m = download_mask(new, old, 0.4)                  # k = 2: |-2| and |2|
    assert m.tolist() == [False, True, False, True, False]
    m3 = download_mask(new, old, 0.6)                 # k = 3: tie 0.5 / -0.5 -> index 0
    assert m3.tolist() == [True, True, False, True, False]
    local = np.array([9, 9, 9, 9, 9], dtype=np.float32)
    out = apply_download(local, new, m)
    assert out.tolist() == [9, -2, 9, 2, 9]
    assert local.tolist() == [9] * 5                  # pure: inputs untouched
    assert download_mask(new, old, 1.0).all()
    layout = Layout((LayoutEntry("a", (2,), "param"), LayoutEntry("b", (3,), "param")))
    assert download_mask(new, old, 0.4, layout, scope="layer").tolist() == \
        [False, True, False, True, False]             # 1 of a (|-2|), 1 of b (|2|)
    with pytest.raises(ValueError, match="shape"):
        download_mask(new, old[:3], 0.5)


# ------------------------------------------------------------------------------ aggregation

def test_sparse_aggregation_exact_overlapping_and_disjoint():
    """Two institutions, weights 1 and 3; coordinate 1 is shared by both, 0 and 2 by one each,
    3 and 4 by nobody (they must stay unchanged)."""
    g = np.array([1, 1, 1, 1, 1], dtype=np.float32)
    u1 = SparseUpdate(np.array([0, 1]), np.array([2.0, 4.0], np.float32), 1.0, 5)
    u2 = SparseUpdate(np.array([1, 2]), np.array([8.0, -4.0], np.float32), 3.0, 5)
    mean = weighted_mean([u1, u2])
    assert mean.tolist() == [2.0, 7.0, -4.0, 0.0, 0.0]          # (1*4 + 3*8)/4 = 7
    new = aggregate(g, [u1, u2])
    assert new.dtype == np.float32 and new.tolist() == [3.0, 8.0, -3.0, 1.0, 1.0]
    # order of the updates does not change the result
    assert aggregate(g, [u2, u1]).tolist() == new.tolist()
    # fully disjoint supports: each coordinate takes its sole contributor's value, any weight
    v1 = SparseUpdate(np.array([0]), np.array([0.5], np.float32), 10.0, 5)
    v2 = SparseUpdate(np.array([4]), np.array([-0.25], np.float32), 0.5, 5)
    assert aggregate(g, [v1, v2]).tolist() == [1.5, 1.0, 1.0, 1.0, 0.75]


def test_partial_updates_through_the_codec_aggregate_exactly():
    """Select -> encode -> decode -> aggregate gives the hand-computed result."""
    lid = b"\x01" * 32
    g = np.zeros(6, dtype=np.float32)
    d1 = np.array([4.0, 0.0, -2.0, 0.0, 0.0, 1.0], np.float32)      # top-2: 0, 2
    d2 = np.array([0.0, 0.0, 6.0, -8.0, 0.0, 0.0], np.float32)      # top-2: 2, 3
    ups = []
    for d, w in ((d1, 2.0), (d2, 6.0)):
        idx, vals = select_update(d, 2 / 6)
        dec = codec.decode_update(codec.encode_update(vals, lid, indices=idx, total_size=6))
        ups.append(SparseUpdate(dec.indices, dec.values, w, 6))
    out = aggregate(g, ups)
    assert out.tolist() == [4.0, 0.0, (2 * -2.0 + 6 * 6.0) / 8, -8.0, 0.0, 0.0]


# ------------------------------------------------------------------------------ BatchNorm policy

def bn_layout() -> Layout:
    return Layout((LayoutEntry("conv.weight", (4,), "param", "Conv2d"),
                   LayoutEntry("bn.weight", (2,), "param", "BatchNorm2d"),
                   LayoutEntry("bn.running_mean", (2,), "buffer", "BatchNorm2d"),
                   LayoutEntry("bn.running_var", (2,), "buffer", "BatchNorm2d")))


def test_eligible_coordinates_only_and_theta_counts_over_them():
    d = np.array([0.1, -0.2, 0.3, 0.05, 0.01, 0.02, 9.0, 8.0, 7.0, 6.0], dtype=np.float32)
    eligible = np.r_[np.ones(6, bool), np.zeros(4, bool)]
    idx, vals = select_update(d, 0.5, eligible=eligible)          # k = 3 of the 6 eligible
    assert idx.tolist() == [0, 1, 2] and vals.tolist() == pytest.approx([0.1, -0.2, 0.3])
    with pytest.raises(ValueError, match="eligible"):
        select_update(d, 0.5, eligible=np.ones(3, bool))


@pytest.mark.parametrize("theta", [1.0, 0.5, 1 / 6])
def test_bn_policy_local_never_uploads_statistics_shared_uploads_all(theta):
    lay = bn_layout()
    d = np.array([0.1, -0.2, 0.3, 0.05, 0.01, 0.02, 9.0, 8.0, 7.0, 6.0], dtype=np.float32)
    buffers = np.arange(6, 10)
    idx, _ = make_selector({"theta_u": theta, "bn_stats": "local"}, lay)(d, 0)
    assert not np.isin(buffers, idx).any()                       # the huge statistics are never picked
    assert idx.size == n_selected(theta, 6)                       # θu of the 6 trainable coordinates
    idx, vals = make_selector({"theta_u": theta, "bn_stats": "shared", "gamma": 0.1}, lay)(d, 0)
    assert np.isin(buffers, idx).all() and idx.size == n_selected(theta, 6) + 4
    assert np.all(np.diff(idx) > 0)
    assert vals[np.isin(idx, buffers)].tolist() == pytest.approx([9.0, 8.0, 7.0, 6.0])   # unclipped
    with pytest.raises(ValueError, match="bn_stats"):
        make_selector({"theta_u": theta, "bn_stats": "public"}, lay)
