"""Compact, versioned, deterministic binary encoding of parameter updates.

An update is a set of (coordinate, value) pairs over a model vector of ``total_size`` float32
coordinates laid out by a :class:`medchain.params.Layout`: either *dense* (every coordinate, in
order) or *sparse* (strictly increasing coordinates, e.g. the top-k selected by partial update).

Wire format, version 1 (all integers little-endian)::

    offset  size        field
    0       3           magic b"MCU"
    3       1           version = 1
    4       1           kind: 0 dense, 1 sparse with delta-varint indices, 2 sparse with bitmap
    5       32          layout id (sha256 of the model layout, see medchain.params.Layout)
    37      4  uint32   total_size P (length of the model vector)
    41      4  uint32   n, number of values (dense: n == P)
    45      4  uint32   m, byte length of the index section
    49      m           index section
    49+m    4n float32  values, little-endian IEEE 754, in index order

Index section by kind:

* dense (0): empty (m = 0); value i belongs to coordinate i.
* delta-varint (1): n unsigned LEB128 varints; the first is the first index, each next one the
  difference to the previous index (>= 1, so indices are strictly increasing by construction).
  Varints must be minimal (no redundant 0x80 continuation bytes) and fit 32 bits, so an index
  set has exactly one varint section (the decoder accepts either kind; the encoder's choice is
  deterministic, see below).
* bitmap (2): ceil(P / 8) bytes; bit i (byte i // 8, bit i % 8 counted from the least significant)
  is set iff coordinate i is present; padding bits after P must be 0 and exactly n bits are set.

The encoder picks the shorter index section of (1) and (2) (varint on a tie): varints win below
a density of about 1/8, the bitmap above.

**No compression.** zlib was measured on real model updates (a CNN of 87,779 parameters after
60 Adam or SGD steps; Δ = w_local - w_global): level 9 saved 11 % on dense updates and 15-17 % on
top-k 10 % / 1 % sparse ones (0 % at 0.1 %); byte-plane shuffling before zlib saved 20-25 %.
The mantissa bits of the values are noise, so nothing more is available cheaply. It is not worth
the risk: compressed bytes depend on the zlib build (stock zlib and zlib-ng, which some Linux
distributions ship as their zlib, produce different streams at the same level), and the encoded
bytes are hashed and put on chain, so the on-chain digests would stop being reproducible across
machines. Version 1 is therefore raw; a later version may add a compressed kind whose coder is
fully specified here (not delegated to a library).

Decoding is strict: anything other than a canonical, well-formed, finite payload raises
:class:`CodecError` (a ValueError) whose message says what is wrong and what to check.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAGIC", "VERSION", "KIND_DENSE", "KIND_SPARSE_VARINT", "KIND_SPARSE_BITMAP", "HEADER_SIZE",
    "CodecError", "DigestMismatch", "Header", "DecodedUpdate",
    "encode_update", "decode_update", "read_header", "digest", "verify",
]

MAGIC = b"MCU"
VERSION = 1
KIND_DENSE = 0
KIND_SPARSE_VARINT = 1
KIND_SPARSE_BITMAP = 2
_KIND_NAMES = {KIND_DENSE: "dense", KIND_SPARSE_VARINT: "sparse-varint",
               KIND_SPARSE_BITMAP: "sparse-bitmap"}
_HEADER = struct.Struct("<3sBB32sIII")
HEADER_SIZE = _HEADER.size  # 49
_U32_MAX = 0xFFFFFFFF


class CodecError(ValueError):
    """An update cannot be encoded or decoded; the message names the problem."""


class DigestMismatch(CodecError):
    """Bytes do not hash to the digest they were announced with."""


@dataclass(frozen=True)
class Header:
    """The fixed 49-byte header of an encoded update."""

    version: int
    kind: int
    layout_id: bytes
    total_size: int
    n: int
    index_bytes: int

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES.get(self.kind, f"unknown({self.kind})")


@dataclass(frozen=True)
class DecodedUpdate:
    """A decoded update.

    layout_id: 32 bytes. total_size: P. indices: int64 ``(n,)`` strictly increasing in [0, P)
    (``arange(P)`` when dense). values: float32 ``(n,)``, finite. dense: True for kind 0.
    """

    layout_id: bytes
    total_size: int
    indices: np.ndarray
    values: np.ndarray
    dense: bool

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    def to_dense(self) -> np.ndarray:
        """float32 ``(total_size,)`` with the values at their indices and zeros elsewhere."""
        if self.dense:
            return self.values.copy()
        out = np.zeros(self.total_size, dtype=np.float32)
        out[self.indices] = self.values
        return out

    def mask(self) -> np.ndarray:
        """bool ``(total_size,)``: True at the coordinates present in the update."""
        if self.dense:
            return np.ones(self.total_size, dtype=bool)
        m = np.zeros(self.total_size, dtype=bool)
        m[self.indices] = True
        return m


# --------------------------------------------------------------------------------------------
# varints (vectorized unsigned LEB128, at most 5 bytes = 32 bits)

def _varint_nbytes(d: np.ndarray) -> np.ndarray:
    d = d.astype(np.uint64, copy=False)
    return (1 + (d >= 1 << 7).astype(np.int64) + (d >= 1 << 14) + (d >= 1 << 21)
            + (d >= 1 << 28))


def _varint_encode(d: np.ndarray) -> bytes:
    d = d.astype(np.uint64, copy=False)
    nb = _varint_nbytes(d)
    out = np.zeros(int(nb.sum()), dtype=np.uint8)
    start = np.cumsum(nb) - nb
    for k in range(5):
        sel = nb > k
        if not sel.any():
            break
        byte = (d[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        byte |= np.where(nb[sel] > k + 1, np.uint64(0x80), np.uint64(0))
        out[start[sel] + k] = byte.astype(np.uint8)
    return out.tobytes()


def _varint_decode(buf: bytes, n: int) -> np.ndarray:
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero((b & 0x80) == 0)
    if ends.size != n or (n and ends[-1] != b.size - 1) or (n == 0 and b.size):
        dangling = b.size and (b[-1] & 0x80)
        raise CodecError(f"index section is corrupt: its {b.size} bytes hold {ends.size} "
                         f"complete varints{' and a dangling continuation byte' if dangling else ''}"
                         f", header says n={n}; the payload was altered or truncated")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 5:
        raise CodecError("index section is corrupt: a varint is longer than 5 bytes "
                         "(indices are 32-bit)")
    if np.any((lengths > 1) & (b[ends] == 0)):
        raise CodecError("index section is not canonical: a varint has redundant trailing "
                         "zero groups (overlong encoding); re-encode with medchain.codec")
    if np.any((lengths == 5) & (b[ends] > 0x0F)):
        raise CodecError("index section is corrupt: a varint exceeds 32 bits")
    vals = np.zeros(n, dtype=np.int64)
    for k in range(5):
        sel = lengths > k
        if not sel.any():
            break
        vals[sel] |= (b[starts[sel] + k].astype(np.int64) & 0x7F) << (7 * k)
    return vals


# --------------------------------------------------------------------------------------------

def _as_layout_id(layout_id) -> bytes:
    if isinstance(layout_id, str):
        try:
            layout_id = bytes.fromhex(layout_id)
        except ValueError:
            raise CodecError(f"layout id {layout_id!r} is not hex") from None
    if not isinstance(layout_id, (bytes, bytearray)) or len(layout_id) != 32:
        raise CodecError(f"layout id must be 32 bytes (Layout.layout_id), got "
                         f"{type(layout_id).__name__} of length "
                         f"{len(layout_id) if hasattr(layout_id, '__len__') else '?'}")
    return bytes(layout_id)


def _check_values(v: np.ndarray, where: str) -> None:
    if not np.isfinite(v).all():
        bad = np.flatnonzero(~np.isfinite(v))
        raise CodecError(f"{where}: {bad.size} value(s) are NaN or Inf (first at position "
                         f"{int(bad[0])}: {v[bad[0]]!r}); check the training for divergence or "
                         "overflow before sharing the update")


def encode_update(values, layout_id, *, indices=None, total_size: int,
                  index_format: str = "auto") -> bytes:
    """Encode an update (format: see the module docstring). Deterministic: same input, same bytes.

    values: float array; float32 ``(total_size,)`` when dense, ``(n,)`` when sparse. Other float
    dtypes are cast to float32 (the wire type); values must be finite after the cast.
    layout_id: 32 bytes (or 64 hex characters), usually ``Layout.layout_id``.
    indices: None for a dense update, else an integer array ``(n,)``, strictly increasing,
    in ``[0, total_size)``.
    total_size: P, the length of the model vector (1 <= P < 2**32).
    index_format: ``"auto"`` (shorter of the two), ``"varint"`` or ``"bitmap"``; sparse only.
    """
    lid = _as_layout_id(layout_id)
    if isinstance(total_size, bool) or not isinstance(total_size, (int, np.integer)):
        raise CodecError(f"total_size must be an int, got {type(total_size).__name__}")
    total_size = int(total_size)
    if not 1 <= total_size <= _U32_MAX:
        raise CodecError(f"total_size {total_size} out of range [1, 2**32 - 1]")
    v = np.asarray(values)
    if v.ndim != 1:
        raise CodecError(f"values must be 1-D, got shape {v.shape}")
    if v.dtype.kind != "f":
        raise CodecError(f"values must be floating point, got dtype {v.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):
        v32 = np.ascontiguousarray(v, dtype="<f4")
    _check_values(v32, "encode_update")
    if indices is None:
        if v32.size != total_size:
            raise CodecError(f"dense update has {v32.size} values, total_size is {total_size}; "
                             "pass indices=... for a sparse update")
        kind, index_section = KIND_DENSE, b""
    else:
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise CodecError(f"indices must be a 1-D integer array, got shape {idx.shape} "
                             f"dtype {idx.dtype}")
        if idx.size != v32.size:
            raise CodecError(f"{idx.size} indices but {v32.size} values; they must pair up")
        if idx.size:
            if idx.dtype.kind == "i" and int(idx.min()) < 0:
                raise CodecError(f"index {int(idx.min())} is negative")
            if int(idx.max()) >= total_size:
                raise CodecError(f"index {int(idx.max())} out of range for total_size "
                                 f"{total_size}")
        idx = idx.astype(np.int64)
        d = np.diff(idx)
        if np.any(d <= 0):
            p = int(np.flatnonzero(d <= 0)[0])
            what = "duplicated" if d[p] == 0 else "unsorted"
            raise CodecError(f"indices must be strictly increasing: {what} at positions "
                             f"{p}, {p + 1} ({int(idx[p])}, {int(idx[p + 1])}); sort them "
                             "(np.argsort) and drop duplicates")
        if index_format not in ("auto", "varint", "bitmap"):
            raise CodecError(f"index_format must be 'auto', 'varint' or 'bitmap', "
                             f"got {index_format!r}")
        deltas = np.concatenate((idx[:1], d)) if idx.size else idx
        bitmap_len = (total_size + 7) // 8
        varint_len = int(_varint_nbytes(deltas).sum()) if idx.size else 0
        use_varint = (index_format == "varint"
                      or (index_format == "auto" and varint_len <= bitmap_len))
        if use_varint:
            kind, index_section = KIND_SPARSE_VARINT, _varint_encode(deltas)
        else:
            m = np.zeros(total_size, dtype=bool)
            m[idx] = True
            kind, index_section = KIND_SPARSE_BITMAP, np.packbits(m, bitorder="little").tobytes()
    header = _HEADER.pack(MAGIC, VERSION, kind, lid, total_size, v32.size, len(index_section))
    return header + index_section + v32.tobytes()


def read_header(data: bytes) -> Header:
    """Parse and check the fixed header only (magic, version, kind, counts)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        if not data.startswith(MAGIC[:len(data)]):
            raise CodecError(f"bad magic {data[:3]!r}: not a medchain update (expected {MAGIC!r})")
        raise CodecError(f"truncated update: {len(data)} bytes, shorter than the "
                         f"{HEADER_SIZE}-byte header; the payload was cut off in transit or storage")
    magic, version, kind, lid, total, n, m = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}: not a medchain update (expected {MAGIC!r}); "
                         "check that the payload is the encoded update, not e.g. its hex or digest")
    if version != VERSION:
        raise CodecError(f"unsupported codec version {version} (this medchain reads version "
                         f"{VERSION}); upgrade medchain on every institution to the same release")
    if kind not in _KIND_NAMES:
        raise CodecError(f"unknown update kind {kind} (known: "
                         f"{', '.join(f'{k}={v}' for k, v in _KIND_NAMES.items())})")
    if total == 0:
        raise CodecError("header says total_size 0; an update needs at least one coordinate")
    if n > total:
        raise CodecError(f"header says n={n} values but total_size is only {total}")
    if kind == KIND_DENSE and (n != total or m != 0):
        raise CodecError(f"dense update header disagrees with itself: n={n}, total_size={total}, "
                         f"index bytes={m} (expected n == total_size and 0 index bytes)")
    if kind == KIND_SPARSE_BITMAP and m != (total + 7) // 8:
        raise CodecError(f"bitmap index section is {m} bytes, expected ceil({total}/8) = "
                         f"{(total + 7) // 8}")
    if kind == KIND_SPARSE_VARINT and not n <= m <= 5 * n:
        raise CodecError(f"varint index section is {m} bytes for n={n} indices (must be "
                         f"between n and 5n)")
    return Header(version, kind, lid, total, n, m)


def decode_update(data: bytes, *, expected_layout_id=None, expected_size: int | None = None,
                  max_abs: float | None = None) -> DecodedUpdate:
    """Decode and validate an encoded update.

    expected_layout_id / expected_size: what the caller's model needs; a mismatch raises.
    max_abs: reject any ``|value| > max_abs`` ("oversized update", a guard against poisoned or
    diverged updates). Raises :class:`CodecError` on any malformed input.
    """
    h = read_header(data)
    data = bytes(data)
    expected_len = HEADER_SIZE + h.index_bytes + 4 * h.n
    if len(data) < expected_len:
        raise CodecError(f"truncated update: {len(data)} bytes, header promises {expected_len} "
                         f"({h.kind_name}, n={h.n}, {h.index_bytes} index bytes); the payload was "
                         "cut off in transit or storage")
    if len(data) > expected_len:
        raise CodecError(f"{len(data) - expected_len} trailing bytes after the update "
                         f"(header promises {expected_len} bytes, got {len(data)}); check that "
                         "payloads are not concatenated or padded")
    if expected_layout_id is not None:
        want = _as_layout_id(expected_layout_id)
        if h.layout_id != want:
            raise CodecError(f"layout id mismatch: update is for layout {h.layout_id.hex()}, "
                             f"this model has {want.hex()}; every institution must build the "
                             "same model architecture")
    if expected_size is not None and h.total_size != int(expected_size):
        raise CodecError(f"size mismatch: update is over {h.total_size} coordinates, the model "
                         f"vector has {int(expected_size)}; check the model architecture")
    isec = data[HEADER_SIZE:HEADER_SIZE + h.index_bytes]
    values = np.frombuffer(data, dtype="<f4", count=h.n,
                           offset=HEADER_SIZE + h.index_bytes).astype(np.float32)
    if h.kind == KIND_DENSE:
        indices = np.arange(h.total_size, dtype=np.int64)
    elif h.kind == KIND_SPARSE_VARINT:
        deltas = _varint_decode(isec, h.n)
        if h.n > 1 and np.any(deltas[1:] == 0):
            p = int(np.flatnonzero(deltas[1:] == 0)[0]) + 1
            raise CodecError(f"duplicated index: entry {p} repeats index "
                             f"{int(deltas[:p + 1].sum())} (zero delta); indices must be "
                             "strictly increasing")
        indices = np.cumsum(deltas, dtype=np.int64)
        if h.n and indices[-1] >= h.total_size:
            p = int(np.flatnonzero(indices >= h.total_size)[0])
            raise CodecError(f"index out of range: entry {p} is {int(indices[p])}, total_size "
                             f"is {h.total_size}")
    else:
        bits = np.unpackbits(np.frombuffer(isec, dtype=np.uint8), bitorder="little")
        if bits[h.total_size:].any():
            raise CodecError(f"index out of range: bitmap sets a bit beyond total_size "
                             f"{h.total_size} (padding bits must be 0)")
        indices = np.flatnonzero(bits[:h.total_size]).astype(np.int64)
        if indices.size != h.n:
            raise CodecError(f"bitmap marks {indices.size} coordinates but the header says "
                             f"n={h.n}; the payload was altered")
    _check_values(values, "decode_update")
    if max_abs is not None and h.n:
        peak = float(np.max(np.abs(values)))
        if peak > max_abs:
            p = int(np.argmax(np.abs(values)))
            raise CodecError(f"oversized update: |value| {peak:.6g} at coordinate "
                             f"{int(indices[p])} exceeds max_abs={max_abs:g}; the sender's "
                             "training diverged or the update is malicious")
    return DecodedUpdate(h.layout_id, h.total_size, indices, values, h.kind == KIND_DENSE)


def _as_digest(d, what: str) -> bytes:
    if isinstance(d, str):
        try:
            d = bytes.fromhex(d.removeprefix("0x"))
        except ValueError:
            raise CodecError(f"{what} {d!r} is not hex") from None
    if not isinstance(d, (bytes, bytearray)) or len(d) != 32:
        raise CodecError(f"{what} must be a 32-byte sha256 digest, got {type(d).__name__}"
                         f"{' of length %d' % len(d) if hasattr(d, '__len__') else ''}")
    return bytes(d)


def digest(data: bytes) -> bytes:
    """sha256 of ``data`` (32 bytes): the digest put on chain for a payload."""
    return hashlib.sha256(data).digest()


def verify(data: bytes, expected_digest, *, what: str = "payload") -> None:
    """Raise :class:`DigestMismatch` unless ``sha256(data) == expected_digest`` (bytes or hex).

    what: a description of ``data`` for the message (e.g. a file name).
    """
    want = _as_digest(expected_digest, "expected digest")
    got = digest(data)
    if got != want:
        raise DigestMismatch(f"digest mismatch for {what} ({len(data)} bytes): expected "
                             f"{want.hex()}, got {got.hex()}; the data were altered or belong "
                             "to another record")
