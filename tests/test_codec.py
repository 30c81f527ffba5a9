"""medchain.codec: wire format (hand-computed bytes), round trips, strict decoding."""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from medchain.codec import (HEADER_SIZE, KIND_DENSE, KIND_SPARSE_BITMAP, KIND_SPARSE_VARINT,
                            CodecError, DigestMismatch, decode_update, digest, encode_update,
                            read_header, verify)

LID = hashlib.sha256(b"test layout").digest()
OTHER = hashlib.sha256(b"other layout").digest()


def pack(kind, total, n, index=b"", values=b"", *, magic=b"MCU", version=1, lid=LID, m=None):
    """Hand-assembled payload (lets tests write malformed ones)."""
    m = len(index) if m is None else m
    return struct.pack("<3sBB32sIII", magic, version, kind, lid, total, n, m) + index + values


def f32(*xs):
    return struct.pack(f"<{len(xs)}f", *xs)


# ---------------------------------------------------------------------------- wire format

def test_header_size():
    assert HEADER_SIZE == 49


def test_dense_bytes_by_hand():
    v = np.array([1.0, -0.0, 2.5], dtype=np.float32)
    data = encode_update(v, LID, total_size=3)
    assert data == b"MCU\x01\x00" + LID + struct.pack("<III", 3, 3, 0) + f32(1.0, -0.0, 2.5)
    d = decode_update(data, expected_layout_id=LID, expected_size=3)
    assert d.dense and d.layout_id == LID and d.total_size == 3 and d.n == 3
    assert d.values.tobytes() == v.tobytes()  # bitwise, -0.0 kept
    assert d.indices.tolist() == [0, 1, 2] and d.indices.dtype == np.int64
    assert d.mask().all()


def test_sparse_varint_bytes_by_hand():
    # deltas 0, 5, 295; 295 = 0b10_0100111 -> LEB128 0xA7 0x02
    data = encode_update(np.array([1.0, -2.0, 0.5], np.float32), LID,
                         indices=np.array([0, 5, 300]), total_size=1000)
    assert data == pack(KIND_SPARSE_VARINT, 1000, 3, b"\x00\x05\xa7\x02", f32(1.0, -2.0, 0.5))
    d = decode_update(data)
    assert not d.dense and d.indices.tolist() == [0, 5, 300]
    assert d.values.tolist() == [1.0, -2.0, 0.5]
    dense = d.to_dense()
    assert dense.shape == (1000,) and dense.dtype == np.float32
    assert dense[[0, 5, 300]].tolist() == [1.0, -2.0, 0.5] and np.count_nonzero(dense) == 3
    assert np.flatnonzero(d.mask()).tolist() == [0, 5, 300]


def test_sparse_bitmap_bytes_by_hand():
    # P = 10: bitmap is 2 bytes, cheaper than 3 varint bytes -> auto picks the bitmap.
    # bits 0, 1 -> byte 0 = 0b11; bit 9 -> byte 1, bit 1 -> 0b10
    data = encode_update(np.array([1.0, 2.0, 3.0], np.float32), LID,
                         indices=np.array([0, 1, 9], dtype=np.uint32), total_size=10)
    assert data == pack(KIND_SPARSE_BITMAP, 10, 3, b"\x03\x02", f32(1.0, 2.0, 3.0))
    assert decode_update(data).indices.tolist() == [0, 1, 9]
    assert read_header(data).kind_name == "sparse-bitmap"


def test_varint_boundaries_and_32_bit_indices():
    total = 2**32 - 1
    idx = np.array([127, 128, 128 + 16383, 128 + 16383 + 16384, total - 1], dtype=np.int64)
    data = encode_update(np.ones(5, np.float32), LID, indices=idx, total_size=total)
    # deltas 127 (1 byte), 1 (1), 16383 (2), 16384 (3), big (5)
    assert read_header(data).index_bytes == 1 + 1 + 2 + 3 + 5
    assert decode_update(data).indices.tolist() == idx.tolist()


# ---------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("frac", [0.1, 0.01, 0.001])
@pytest.mark.parametrize("fmt", ["auto", "varint", "bitmap"])
def test_sparse_roundtrip_bitwise(frac, fmt):
    rng = np.random.default_rng(0)
    P = 100_000
    k = int(P * frac)
    idx = np.sort(rng.choice(P, k, replace=False))
    vals = (rng.standard_normal(k) * 1e-3).astype(np.float32)
    data = encode_update(vals, LID, indices=idx, total_size=P, index_format=fmt)
    d = decode_update(data, expected_layout_id=LID, expected_size=P, max_abs=1.0)
    assert np.array_equal(d.indices, idx) and d.values.tobytes() == vals.tobytes()
    assert (read_header(data).kind == KIND_SPARSE_BITMAP) == (fmt == "bitmap")


def test_dense_roundtrip_special_values():
    rng = np.random.default_rng(1)
    v = rng.standard_normal(1000).astype(np.float32)
    v[:4] = [np.finfo(np.float32).max, -np.finfo(np.float32).tiny / 4, -0.0, 1e-45]
    data = encode_update(v, LID, total_size=1000)
    assert len(data) == HEADER_SIZE + 4000
    d = decode_update(data)
    assert d.values.tobytes() == v.tobytes() and d.to_dense().tobytes() == v.tobytes()
    assert d.values.flags.writeable


def test_empty_sparse_update():
    data = encode_update(np.zeros(0, np.float32), LID, indices=np.zeros(0, np.int64),
                         total_size=5)
    d = decode_update(data, max_abs=0.0)
    assert d.n == 0 and not d.to_dense().any() and not d.mask().any()


def test_encoding_is_deterministic():
    rng = np.random.default_rng(2)
    idx = np.sort(rng.choice(5000, 300, replace=False))
    vals = rng.standard_normal(300).astype(np.float32)
    a = encode_update(vals, LID, indices=idx, total_size=5000)
    b = encode_update(vals.copy(), LID.hex(), indices=idx.astype(np.uint32), total_size=5000)
    c = encode_update(vals.astype(">f4"), bytearray(LID), indices=idx.astype(np.int32),
                      total_size=np.int64(5000))
    assert a == b == c
    assert digest(a) == digest(b)


def test_auto_picks_shorter_index_section():
    P = 800
    few = np.arange(0, P, 50)              # 16 varint bytes < 100 bitmap bytes
    many = np.arange(0, P, 2)              # 400 varint bytes > 100 bitmap bytes
    assert read_header(encode_update(np.ones(few.size), LID, indices=few,
                                     total_size=P)).kind == KIND_SPARSE_VARINT
    assert read_header(encode_update(np.ones(many.size), LID, indices=many,
                                     total_size=P)).kind == KIND_SPARSE_BITMAP


# ---------------------------------------------------------------------------- encode errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(values=[1.0, 2.0], indices=[3, 1], total_size=5), "unsorted at positions 0, 1"),
    (dict(values=[1.0, 2.0], indices=[1, 1], total_size=5), "duplicated at positions 0, 1"),
    (dict(values=[1.0], indices=[5], total_size=5), "index 5 out of range"),
    (dict(values=[1.0], indices=[-1], total_size=5), "index -1 is negative"),
    (dict(values=[1.0, 2.0], indices=[1], total_size=5), "1 indices but 2 values"),
    (dict(values=[1.0, float("nan")], indices=[0, 1], total_size=5), "NaN or Inf"),
    (dict(values=[1e39], indices=[0], total_size=5), "NaN or Inf"),  # float64 -> float32 overflow
    (dict(values=[1.0, 2.0], total_size=3), "dense update has 2 values, total_size is 3"),
    (dict(values=[1.0], total_size=0), "total_size 0 out of range"),
    (dict(values=[1], total_size=1), "floating point"),
    (dict(values=[1.0], indices=[0.0], total_size=1), "integer array"),
    (dict(values=[1.0], indices=[0], total_size=1, index_format="zip"), "index_format"),
])
def test_encode_rejects(kwargs, message):
    kwargs = dict(kwargs)
    values = np.asarray(kwargs.pop("values"))
    if "indices" in kwargs:
        kwargs["indices"] = np.asarray(kwargs["indices"])
    with pytest.raises(CodecError, match=message):
        encode_update(values, LID, **kwargs)


def test_encode_rejects_bad_layout_id():
    with pytest.raises(CodecError, match="32 bytes"):
        encode_update(np.ones(1, np.float32), b"short", total_size=1)
    with pytest.raises(CodecError, match="not hex"):
        encode_update(np.ones(1, np.float32), "zz" * 32, total_size=1)


# ---------------------------------------------------------------------------- strict decoding

GOOD_SPARSE = pack(KIND_SPARSE_VARINT, 1000, 3, b"\x00\x05\xa7\x02", f32(1.0, -2.0, 0.5))


@pytest.mark.parametrize("data, message", [
    (b"XYZ" + GOOD_SPARSE[3:], "bad magic b'XYZ'"),
    (b"", "truncated update: 0 bytes"),
    (b"PK\x03\x04", "bad magic"),
    (GOOD_SPARSE[:20], "truncated update: 20 bytes, shorter than the 49-byte header"),
    (pack(KIND_DENSE, 1, 1, values=f32(1.0), version=2), "unsupported codec version 2"),
    (pack(7, 1, 1, values=f32(1.0)), "unknown update kind 7"),
    (GOOD_SPARSE[:-1], "truncated update: 64 bytes, header promises 65"),
    (GOOD_SPARSE + b"\x00", "1 trailing bytes"),
    (pack(KIND_SPARSE_VARINT, 2, 3, b"\x00\x01\x01", f32(1, 2, 3)), "n=3 values but total_size"),
    (pack(KIND_DENSE, 3, 2, values=f32(1, 2)), "dense update header disagrees"),
    (pack(KIND_DENSE, 1, 1, b"\x00", f32(1)), "dense update header disagrees"),
    (pack(KIND_DENSE, 0, 0), "total_size 0"),
    (pack(KIND_SPARSE_BITMAP, 10, 1, b"\x01", f32(1)), "bitmap index section is 1 bytes"),
    (pack(KIND_SPARSE_VARINT, 10, 2, b"\x00", f32(1, 2)), "varint index section is 1 bytes"),
    # index section length agrees, content does not
    (pack(KIND_SPARSE_VARINT, 1000, 2, b"\x00\x85", f32(1, 2)), "dangling continuation"),
    (pack(KIND_SPARSE_VARINT, 1000, 2, b"\x00\x85\x01\x01", f32(1, 2)),
     "hold 3 complete varints"),
    (pack(KIND_SPARSE_VARINT, 1000, 1, b"\x85\x00", f32(1)), "not canonical"),
    (pack(KIND_SPARSE_VARINT, 2**32 - 1, 1, b"\xff\xff\xff\xff\x1f", f32(1)), "exceeds 32 bits"),
    (pack(KIND_SPARSE_VARINT, 2**32 - 1, 1, b"\xff\xff\xff\xff\xff\x01", f32(1)),
     "between n and 5n"),
    # unsorted indices cannot be written in either index kind (deltas are unsigned, bitmaps
    # are ordered); duplicates and out-of-range ones can:
    (pack(KIND_SPARSE_VARINT, 1000, 3, b"\x04\x00\x02", f32(1, 2, 3)),
     "duplicated index: entry 1 repeats index 4"),
    (pack(KIND_SPARSE_VARINT, 10, 2, b"\x04\x06", f32(1, 2)),
     "index out of range: entry 1 is 10, total_size is 10"),
    (pack(KIND_SPARSE_BITMAP, 10, 1, b"\x00\x04", f32(1)), "padding bits must be 0"),
    (pack(KIND_SPARSE_BITMAP, 10, 2, b"\x01\x00", f32(1, 2)), "bitmap marks 1 coordinates"),
    (pack(KIND_DENSE, 2, 2, values=f32(1.0, float("nan"))), "NaN or Inf .*position 1"),
    (pack(KIND_DENSE, 2, 2, values=f32(float("-inf"), 1.0)), "NaN or Inf .*position 0"),
])
def test_decode_rejects(data, message):
    with pytest.raises(CodecError, match=message):
        decode_update(data)


def test_decode_checks_what_the_caller_expects():
    with pytest.raises(CodecError, match=f"layout id mismatch: update is for layout {LID.hex()}, "
                                         f"this model has {OTHER.hex()}"):
        decode_update(GOOD_SPARSE, expected_layout_id=OTHER)
    with pytest.raises(CodecError, match="size mismatch: update is over 1000 coordinates, "
                                         "the model vector has 999"):
        decode_update(GOOD_SPARSE, expected_size=999)
    with pytest.raises(CodecError, match=r"oversized update: \|value\| 2 at coordinate 5 "
                                         r"exceeds max_abs=1.5"):
        decode_update(GOOD_SPARSE, max_abs=1.5)
    assert decode_update(GOOD_SPARSE, expected_layout_id=LID.hex(), expected_size=1000,
                         max_abs=2.0).n == 3
    with pytest.raises(CodecError, match="expected bytes"):
        decode_update("not bytes")


def test_codec_error_is_value_error():
    assert issubclass(CodecError, ValueError) and issubclass(DigestMismatch, CodecError)


# ---------------------------------------------------------------------------- digests

def test_digest_and_verify():
    assert digest(GOOD_SPARSE) == hashlib.sha256(GOOD_SPARSE).digest()
    d = digest(GOOD_SPARSE)
    verify(GOOD_SPARSE, d)
    verify(GOOD_SPARSE, d.hex())
    verify(GOOD_SPARSE, "0x" + d.hex())
    tampered = GOOD_SPARSE[:-1] + b"\x01"
    with pytest.raises(DigestMismatch) as e:
        verify(tampered, d)
    assert d.hex() in str(e.value) and digest(tampered).hex() in str(e.value)
    with pytest.raises(CodecError, match="32-byte"):
        verify(GOOD_SPARSE, d[:16])
