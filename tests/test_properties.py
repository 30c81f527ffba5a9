"""Property-based tests (hypothesis) of what replicas must agree on bit for bit: the update codec
(round trip; strict decoding — every truncated, padded or garbled payload is refused unless it is
itself a canonical encoding) and the aggregation rules (order independence, bounds)."""
from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e .[test]")
from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

from medchain import codec  # noqa: E402
from medchain.aggregation import (SparseUpdate, combine, coordinate_median, krum_selection,  # noqa: E402
                                  trimmed_mean, weighted_mean)

# No example database in the repository; no per-example deadline (CI machines are loaded).
PROPS = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LAYOUT = bytes(range(32))
KINDS = {codec.KIND_DENSE: "auto", codec.KIND_SPARSE_VARINT: "varint", codec.KIND_SPARSE_BITMAP: "bitmap"}

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def updates(draw, max_size: int = 300):
    """(values float32 (n,), indices int64 (n,) or None for dense, total_size, index_format)."""
    total = draw(st.integers(1, max_size))
    dense = draw(st.booleans())
    if dense:
        idx = None
        n = total
    else:
        idx = np.array(sorted(draw(st.sets(st.integers(0, total - 1), max_size=total))), dtype=np.int64)
        n = idx.size
    values = np.array(draw(st.lists(finite32, min_size=n, max_size=n)), dtype=np.float32)
    fmt = "auto" if dense else draw(st.sampled_from(["auto", "varint", "bitmap"]))
    return values, idx, total, fmt


def _encode(values, idx, total, fmt) -> bytes:
    return codec.encode_update(values, LAYOUT, indices=idx, total_size=total, index_format=fmt)


@PROPS
@given(updates())
def test_codec_round_trip_is_exact_and_canonical(u):
    values, idx, total, fmt = u
    data = _encode(values, idx, total, fmt)
    dec = codec.decode_update(data, expected_layout_id=LAYOUT, expected_size=total)
    assert dec.total_size == total and dec.n == values.size
    assert np.array_equal(dec.indices, np.arange(total) if idx is None else idx)
    assert dec.values.tobytes() == values.tobytes()                 # bit for bit (signed zeros too)
    h = codec.read_header(data)
    again = _encode(dec.values, None if dec.dense else dec.indices, total, KINDS[h.kind])
    assert again == data                                            # decoding then encoding: same bytes


@PROPS
@given(updates(), st.data())
def test_codec_refuses_every_truncation_and_padding(u, data):
    payload = _encode(*u)
    cut = data.draw(st.integers(0, len(payload) - 1), label="cut")
    with pytest.raises(codec.CodecError):
        codec.decode_update(payload[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
    with pytest.raises(codec.CodecError, match="trailing bytes"):
        codec.decode_update(payload + extra)


@PROPS
@given(updates(max_size=120), st.data())
def test_codec_accepts_a_garbled_payload_only_if_it_is_canonical(u, data):
    """Strictness: garbling bytes either makes the payload refused, or yields another payload that
    is exactly the canonical encoding of what it decodes to (never two byte strings for one update,
    never a silently 'repaired' one)."""
    payload = bytearray(_encode(*u))
    for _ in range(data.draw(st.integers(1, 3), label="n_flips")):
        pos = data.draw(st.integers(0, len(payload) - 1), label="pos")
        payload[pos] ^= data.draw(st.integers(1, 255), label="xor")
    payload = bytes(payload)
    try:
        dec = codec.decode_update(payload)
    except codec.CodecError:
        return
    h = codec.read_header(payload)
    again = codec.encode_update(dec.values, dec.layout_id, indices=None if dec.dense else dec.indices,
                                total_size=dec.total_size, index_format=KINDS[h.kind])
    assert again == payload
    assert np.isfinite(dec.values).all()


@PROPS
@given(st.binary(max_size=200))
def test_codec_never_crashes_on_arbitrary_bytes(blob):
    try:
        codec.decode_update(blob)
    except codec.CodecError:
        pass


# ------------------------------------------------------------------------------ aggregation
small = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def rounds(draw, min_n: int = 1, max_n: int = 7, max_p: int = 12, sparse: bool = True):
    """A round of n sparse (or dense) updates over P coordinates with positive weights."""
    n = draw(st.integers(min_n, max_n))
    p = draw(st.integers(1, max_p))
    out = []
    for _ in range(n):
        if sparse:
            idx = np.array(sorted(draw(st.sets(st.integers(0, p - 1), min_size=1, max_size=p))), dtype=np.int64)
        else:
            idx = np.arange(p)
        vals = np.array(draw(st.lists(small, min_size=idx.size, max_size=idx.size)), dtype=np.float32)
        w = float(draw(st.integers(1, 10_000)))
        out.append(SparseUpdate(idx, vals, w, p))
    return out


def _shared_bounds(ups):
    p = ups[0].total_size
    lo = np.full(p, np.inf)
    hi = np.full(p, -np.inf)
    for u in ups:
        lo[u.indices] = np.minimum(lo[u.indices], u.values.astype(np.float64))
        hi[u.indices] = np.maximum(hi[u.indices], u.values.astype(np.float64))
    shared = np.isfinite(lo)
    return np.where(shared, lo, 0.0), np.where(shared, hi, 0.0), shared


@PROPS
@given(rounds(), st.randoms(use_true_random=False))
def test_median_and_trimmed_mean_do_not_depend_on_the_order_of_updates(ups, rnd):
    perm = list(ups)
    rnd.shuffle(perm)
    for rule in ("median", "trimmed_mean:0.2", "trimmed_mean:0.4"):
        assert np.array_equal(combine(ups, rule), combine(perm, rule)), rule


@PROPS
@given(rounds(min_n=3, sparse=False), st.randoms(use_true_random=False))
def test_norm_clip_and_multi_krum_do_not_depend_on_the_order_of_updates(ups, rnd):
    order = list(range(len(ups)))
    rnd.shuffle(order)
    perm = [ups[i] for i in order]
    for rule in ("norm_clip", "norm_clip:1.5"):                  # summed in input order: equal to rounding
        a, b = combine(ups, rule), combine(perm, rule)
        assert np.allclose(a, b, rtol=1e-12, atol=1e-9 * (1 + np.abs(a).max())), rule
    keep, keep_p = krum_selection(ups, 1), krum_selection(perm, 1)
    rows = np.stack([u.values.astype(np.float64) for u in ups])
    d2 = ((rows[:, None] - rows[None]) ** 2).sum(-1)
    k = min(max(1, len(ups) - 3), len(ups) - 1)
    scores = np.array([np.sort(np.delete(d2[i], i))[:k].sum() for i in range(len(ups))])
    assume(len(np.unique(scores)) == len(ups))                   # ties are broken by position
    assert sorted(order[i] for i in keep_p) == keep.tolist()


@PROPS
@given(rounds())
def test_every_rule_stays_within_the_shared_values_per_coordinate(ups):
    lo, hi, shared = _shared_bounds(ups)
    for name, out in (("mean", weighted_mean(ups)), ("median", coordinate_median(ups)),
                      ("trimmed_mean", trimmed_mean(ups, 0.2))):
        tol = 1e-9 * (1 + np.abs(hi) + np.abs(lo))
        assert np.all(out >= lo - tol) and np.all(out <= hi + tol), name
        assert np.all(out[~shared] == 0), name                   # nobody shared: unchanged


@PROPS
@given(rounds(), st.integers(2, 1000))
def test_weighted_mean_depends_on_weight_ratios_only_and_fixes_agreement(ups, k):
    scaled = [SparseUpdate(u.indices, u.values, u.weight * k, u.total_size) for u in ups]
    a = weighted_mean(ups)
    assert np.allclose(weighted_mean(scaled), a, rtol=1e-12, atol=1e-12)
    same = [SparseUpdate(u.indices, np.full(u.indices.size, 0.375, np.float32), u.weight, u.total_size)
            for u in ups]
    _, _, shared = _shared_bounds(same)
    assert np.all(weighted_mean(same)[shared] == 0.375)          # members that agree set the value


@PROPS
@given(rounds(min_n=2, sparse=False), st.integers(0, 6))
def test_one_members_weight_is_bounded_by_its_share(ups, j):
    """With rule mean, member j moves each coordinate at most its weight share of its distance
    to the others' mean: a capped sample count bounds what one member can do."""
    j = j % len(ups)
    others = [u for i, u in enumerate(ups) if i != j]
    w_j, w_o = ups[j].weight, sum(u.weight for u in others)
    base = weighted_mean(others)
    out = weighted_mean(ups)
    share = w_j / (w_j + w_o)
    expected = base + share * (ups[j].values.astype(np.float64) - base)
    assert np.allclose(out, expected, rtol=1e-9, atol=1e-9)
