"""medchain.blobstore: content-addressed files, verification, inline vs blob placement."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from medchain import blobstore
from medchain.blobstore import (BlobNotFound, BlobStore, FileBlobStore, MemoryBlobStore,
                                fetch_payload, place_payload, register_scheme, store_for)
from medchain.codec import CodecError, DigestMismatch


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_get_layout_and_idempotence(tmp_path):
    store = FileBlobStore(tmp_path / "blobs", fsync=False)
    data = b"hello update" * 100
    d = store.put(data)
    h = hashlib.sha256(data).hexdigest()
    assert d == bytes.fromhex(h)
    path = tmp_path / "blobs" / h[:2] / h[2:4] / h
    assert store.path_for(d) == path and path.read_bytes() == data
    assert store.has(d) and d in store and store.has(h)
    assert store.get(d) == data and store.get(h) == data
    assert store.put(data) == d  # same content: same digest, still one file
    assert files_under(tmp_path) == [path]
    d2 = store.put(b"other")
    assert d2 != d and len(files_under(tmp_path)) == 2


def test_missing_blob(tmp_path):
    store = FileBlobStore(tmp_path)
    d = hashlib.sha256(b"never stored").digest()
    assert not store.has(d)
    with pytest.raises(BlobNotFound) as e:
        store.get(d)
    assert isinstance(e.value, KeyError) and isinstance(e.value, LookupError)
    msg = str(e.value)
    assert d.hex() in msg and str(tmp_path) in msg and not msg.startswith("'")
    with pytest.raises(CodecError, match="32-byte"):
        store.get(b"abc")


def test_tampered_file_is_detected_and_put_repairs_it(tmp_path):
    store = FileBlobStore(tmp_path, fsync=False)
    data = bytes(range(256))
    d = store.put(data)
    path = store.path_for(d)
    path.write_bytes(data[:-1] + b"\x00")
    with pytest.raises(DigestMismatch) as e:
        store.get(d)
    assert str(path) in str(e.value) and d.hex() in str(e.value)
    store.put(data)  # the stored copy is wrong: put rewrites it
    assert store.get(d) == data


def test_atomic_write_leaves_no_temporary_files(tmp_path, monkeypatch):
    store = FileBlobStore(tmp_path)
    for i in range(5):
        store.put(b"x" * i)
    names = [p.name for p in files_under(tmp_path)]
    assert len(names) == 5 and all(len(n) == 64 and not n.startswith(".") for n in names)

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put(b"never published")
    monkeypatch.undo()
    assert len(files_under(tmp_path)) == 5  # neither the blob nor its temporary file
    assert not store.has(hashlib.sha256(b"never published").digest())


def test_memory_store():
    store = MemoryBlobStore("t")
    d = store.put(b"abc")
    assert store.get(d) == b"abc" and store.has(d)
    with pytest.raises(BlobNotFound, match="memory:t"):
        store.get(hashlib.sha256(b"x").digest())


def test_store_for(tmp_path, monkeypatch):
    assert store_for(None) is None
    s = MemoryBlobStore()
    assert store_for(s) is s
    for spec in (str(tmp_path), tmp_path, tmp_path.as_uri()):
        fs = store_for(spec)
        assert isinstance(fs, FileBlobStore) and fs.root == tmp_path
    assert isinstance(store_for("memory:"), MemoryBlobStore)
    assert store_for("memory:") is not store_for("memory:")  # anonymous: fresh each time
    assert store_for("memory:shared") is store_for("memory:shared")  # named: one per process
    assert isinstance(store_for("relative/dir"), FileBlobStore)
    with pytest.raises(ValueError, match="no blob store for scheme 'ipfs'"):
        store_for("ipfs://bafy")
    monkeypatch.setattr(blobstore, "_SCHEMES", dict(blobstore._SCHEMES))  # undone after the test
    register_scheme("test-mem", lambda uri: MemoryBlobStore(uri))
    assert isinstance(store_for("test-mem:x"), MemoryBlobStore)


def test_place_and_fetch_inline_and_blob(tmp_path):
    store = FileBlobStore(tmp_path, fsync=False)
    small, big = b"s" * 100, b"b" * 101
    d, inline = place_payload(small, store, max_inline=100)  # boundary: len == max_inline
    assert d == hashlib.sha256(small).digest() and inline == small
    assert files_under(tmp_path) == []  # inline payloads are not stored
    assert fetch_payload(d, inline, store) == small
    assert fetch_payload(d, inline, None) == small

    d2, inline2 = place_payload(big, store, max_inline=100)
    assert inline2 == b"" and store.has(d2)
    assert fetch_payload(d2, inline2, store) == big
    with pytest.raises(BlobNotFound, match="no blob store is configured"):
        fetch_payload(d2, b"", None)
    with pytest.raises(BlobNotFound, match=d.hex()):
        fetch_payload(d, b"", store)  # digest of an inline payload is not in the store

    with pytest.raises(DigestMismatch, match="inline payload"):
        fetch_payload(d, small[:-1] + b"t", store)
    with pytest.raises(ValueError, match="no blob store"):
        place_payload(big, None, max_inline=100)

    de, ie = place_payload(b"", None, max_inline=0)  # the empty payload always goes inline
    assert ie == b"" and fetch_payload(de, ie, None) == b""


def test_blobstore_is_abstract():
    with pytest.raises(TypeError):
        BlobStore()
