"""Content-addressed payload store, and the rule that decides what goes on chain.

Payloads (encoded updates, see :mod:`medchain.codec`) are addressed by their sha256 digest. Small
ones travel inline in the chain event; larger ones are put in a :class:`BlobStore` and only the
digest goes on chain (:func:`place_payload`). Whoever reads a record gets the bytes back through
:func:`fetch_payload`, which verifies them against the digest on either path.

Stores:

* :class:`FileBlobStore` -- one file per payload, ``<root>/<hex[0:2]>/<hex[2:4]>/<hex>``,
  written atomically (temporary file in the same directory, fsync, ``os.replace``), so a reader
  never sees a partial file and concurrent writers of the same content are harmless. A shared
  directory (NFS, a synced folder) makes it usable across processes and hosts.
* :class:`MemoryBlobStore` -- a dict, for tests and single-process simulation.

:func:`store_for` builds a store from a URI (``file:///path``, a plain path, ``memory:NAME`` --
the same process-wide store for the same NAME, a fresh one for a bare ``memory:``);
:func:`register_scheme` adds other back ends (IPFS, S3, ...) without touching callers.
"""
from __future__ import annotations

import abc
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

from .codec import DigestMismatch, _as_digest, digest, verify

__all__ = [
    "BlobNotFound", "BlobStore", "FileBlobStore", "MemoryBlobStore",
    "store_for", "register_scheme", "place_payload", "fetch_payload",
]

_EMPTY_DIGEST = digest(b"")


class BlobNotFound(KeyError):
    """No payload with this digest in the store (a KeyError, hence a LookupError)."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else "blob not found"


class BlobStore(abc.ABC):
    """Content-addressed store of byte payloads, keyed by their 32-byte sha256 digest."""

    #: Short description used in error messages (a URI or path).
    uri: str = ""

    @abc.abstractmethod
    def put(self, data: bytes) -> bytes:
        """Store ``data``; return its sha256 digest. Idempotent for the same content."""

    @abc.abstractmethod
    def get(self, digest: bytes) -> bytes:
        """The payload with this digest, verified. Raises :class:`BlobNotFound` or
        :class:`~medchain.codec.DigestMismatch` (stored bytes corrupted)."""

    @abc.abstractmethod
    def has(self, digest: bytes) -> bool:
        """True if a payload with this digest is stored (not verified)."""

    def __contains__(self, digest) -> bool:
        return self.has(digest)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class FileBlobStore(BlobStore):
    """Payloads as files named by their sha256 hex under ``root`` (two-level fan-out).

    root: directory, created on first use. fsync: flush each file to disk before publishing it
    (default True; turn off for throw-away simulations).
    """

    def __init__(self, root: str | os.PathLike, *, fsync: bool = True):
        self.root = Path(root).expanduser().absolute()
        self.fsync = fsync
        self.uri = self.root.as_uri()

    def path_for(self, digest) -> Path:
        """File that holds (or would hold) the payload with this digest."""
        h = _as_digest(digest, "digest").hex()
        return self.root / h[:2] / h[2:4] / h

    def has(self, digest) -> bool:
        return self.path_for(digest).is_file()

    def put(self, data: bytes) -> bytes:
        data = bytes(data)
        d = digest(data)
        path = self.path_for(d)
        if path.is_file():
            try:
                if path.stat().st_size == len(data) and digest(path.read_bytes()) == d:
                    return d  # already stored, intact
            except OSError:
                pass  # unreadable: rewrite it below
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return d

    def get(self, digest) -> bytes:
        d = _as_digest(digest, "digest")
        path = self.path_for(d)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"no blob {d.hex()} in store {self.root} (expected file {path}); "
                               "was the payload put into this store, or is the store path "
                               "shared with the institution that submitted it?") from None
        verify(data, d, what=f"blob file {path}")
        return data


class MemoryBlobStore(BlobStore):
    """In-process store (a dict); verification as in :class:`FileBlobStore`."""

    def __init__(self, name: str = ""):
        self._blobs: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self.uri = f"memory:{name}"

    def put(self, data: bytes) -> bytes:
        data = bytes(data)
        d = digest(data)
        with self._lock:
            self._blobs[d] = data
        return d

    def get(self, digest) -> bytes:
        d = _as_digest(digest, "digest")
        try:
            data = self._blobs[d]
        except KeyError:
            raise BlobNotFound(f"no blob {d.hex()} in store {self.uri}") from None
        verify(data, d, what=f"blob {d.hex()} in {self.uri}")
        return data

    def has(self, digest) -> bool:
        return _as_digest(digest, "digest") in self._blobs


_SCHEMES: dict[str, Callable[[str], BlobStore]] = {}
_REGISTRY_LOCK = threading.Lock()


def register_scheme(scheme: str, factory: Callable[[str], BlobStore]) -> None:
    """Make :func:`store_for` build ``factory(uri)`` for URIs ``scheme:...``."""
    _SCHEMES[scheme.lower()] = factory


def _file_factory(uri: str) -> BlobStore:
    p = urlparse(uri)
    if p.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {uri!r} names host {p.netloc!r}; use file:///absolute/path")
    return FileBlobStore(unquote(p.path))


register_scheme("file", _file_factory)
_NAMED_MEMORY_STORES: dict[str, MemoryBlobStore] = {}


def _memory_factory(uri: str) -> BlobStore:
    name = uri.partition(":")[2]
    if not name:
        return MemoryBlobStore()
    with _REGISTRY_LOCK:
        return _NAMED_MEMORY_STORES.setdefault(name, MemoryBlobStore(name))


register_scheme("memory", _memory_factory)


def store_for(uri_or_path: str | os.PathLike | BlobStore | None) -> BlobStore | None:
    """A store from a URI (``file:///data/blobs``, ``memory:``), a plain path, an existing store
    (returned as is) or None (returned as None: no store, everything must go inline)."""
    if uri_or_path is None or isinstance(uri_or_path, BlobStore):
        return uri_or_path
    if isinstance(uri_or_path, os.PathLike):
        return FileBlobStore(uri_or_path)
    s = str(uri_or_path)
    scheme, sep, _ = s.partition(":")
    # a one-letter "scheme" is a Windows drive letter; no colon means a plain path
    if not sep or len(scheme) == 1 or "/" in scheme:
        return FileBlobStore(s)
    factory = _SCHEMES.get(scheme.lower())
    if factory is None:
        raise ValueError(f"no blob store for scheme {scheme!r} in {s!r}; known schemes: "
                         f"{sorted(_SCHEMES)} (or give a plain directory path)")
    return factory(s)


def place_payload(data: bytes, store: BlobStore | None, max_inline: int) -> tuple[bytes, bytes]:
    """Decide where a payload travels: returns ``(digest, inline_payload)``.

    ``len(data) <= max_inline``: the payload goes inline (returned as ``inline_payload``, not
    stored). Otherwise it is put in ``store`` and ``inline_payload`` is ``b""``; without a store
    that is an error.
    """
    data = bytes(data)
    if max_inline < 0:
        raise ValueError(f"max_inline must be >= 0, got {max_inline}")
    d = digest(data)
    if len(data) <= max_inline:
        return d, data
    if store is None:
        raise ValueError(f"payload of {len(data)} bytes exceeds max_inline={max_inline} and no "
                         "blob store is configured; pass a store (e.g. store_for('file:///…')) "
                         "or raise max_inline")
    stored = store.put(data)
    if stored != d:  # a store that does not address by sha256 would break every reader
        raise DigestMismatch(f"store {store!r} returned digest {stored.hex()} for a payload whose "
                             f"sha256 is {d.hex()}")
    return d, b""


def fetch_payload(digest, inline: bytes, store: BlobStore | None) -> bytes:
    """The payload of a record: ``inline`` if non-empty, else from ``store``; always verified
    against ``digest`` (:class:`~medchain.codec.DigestMismatch` otherwise).

    An empty inline payload whose digest is sha256(b"") is the empty payload itself.
    """
    d = _as_digest(digest, "digest")
    inline = bytes(inline)
    if inline or d == _EMPTY_DIGEST:
        verify(inline, d, what="inline payload")
        return inline
    if store is None:
        raise BlobNotFound(f"payload {d.hex()} is not inline and no blob store is configured; "
                           "pass the store the submitter used (store_for(uri))")
    return store.get(d)
