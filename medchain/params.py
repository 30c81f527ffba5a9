"""A model's state as one flat float32 vector, and the layout that gives its coordinates names.

Everything that travels between institutions (updates, global models, their digests) is a
vector ``w`` of shape ``(P,)``, dtype float32, over a :class:`Layout`: the ordered list of every
*floating-point* tensor of the model's ``state_dict`` -- parameters *and* floating buffers such as
BatchNorm ``running_mean`` / ``running_var``.

Integer buffers (BatchNorm ``num_batches_tracked``, any other int/bool tensor) are **not** part of
the vector: they are bookkeeping, not weights, and cannot be averaged. :func:`unflatten` and
:func:`load_flat` keep them from the local model (``like``) untouched.

Coordinates are laid out entry by entry in ``state_dict`` order, each tensor in C (row-major) order.
Tensors of other floating dtypes (float16, bfloat16, float64) are converted to float32 in the vector
and back to their own dtype on load (float64 loses precision beyond float32; the vector is the
reference).

The layout id (:attr:`Layout.layout_id`) is the sha256 of a canonical JSON of the entries
(name, shape, kind, owning module type). Two institutions can exchange vectors only if their
layout ids are equal; it is written into every encoded update (:mod:`medchain.codec`) and into
every global-model digest (:func:`digest_vector`).

Tied (shared) parameters appear under every ``state_dict`` name that refers to them, so they occupy
several ranges of the vector; :func:`load_flat` writes each range in order (identical values for
vectors produced by :func:`model_vector`).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import types
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "BATCHNORM_TYPES",
    "NORM_TYPES",
    "LayoutEntry",
    "Layout",
    "flatten",
    "unflatten",
    "load_flat",
    "model_vector",
    "select_names",
    "mask_for_module_types",
    "digest_vector",
]

#: Module class names treated as BatchNorm (the layers FedBN keeps local).
BATCHNORM_TYPES: tuple[str, ...] = (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    # timm's fused BatchNorm + activation layers
    "BatchNormAct2d", "FrozenBatchNorm2d", "FrozenBatchNormAct2d",
)
#: All normalization layer class names (BatchNorm plus Group/Layer/Instance norm).
NORM_TYPES: tuple[str, ...] = BATCHNORM_TYPES + (
    "GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LocalResponseNorm", "RMSNorm", "GroupNormAct", "LayerNorm2d",
)

_LAYOUT_FORMAT = "medchain.layout/1"
_KINDS = ("param", "buffer")


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of the layout.

    name: the ``state_dict`` key (e.g. ``"features.0.weight"``).
    shape: the tensor shape. kind: ``"param"`` (an ``nn.Parameter``) or ``"buffer"``.
    module_type: class name of the module that owns the tensor (``"Conv2d"``, ``"BatchNorm2d"``,
    ...; ``""`` if unknown).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    module_type: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"LayoutEntry {self.name!r}: kind must be one of {_KINDS}, "
                             f"got {self.kind!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numel(self) -> int:
        """Number of scalars (product of the shape; 1 for a scalar tensor)."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def is_batchnorm(self) -> bool:
        """True when the owning module is a BatchNorm layer (see :data:`BATCHNORM_TYPES`)."""
        return self.module_type in BATCHNORM_TYPES

    @property
    def role(self) -> str:
        """``"bn_param"``, ``"bn_buffer"``, ``"param"`` or ``"buffer"``.

        BatchNorm affine weights/biases are ``"bn_param"``, their running statistics
        ``"bn_buffer"`` -- the tensors FedBN-style personalization keeps local.
        """
        return ("bn_" if self.is_batchnorm else "") + self.kind

    def to_json(self) -> list:
        return [self.name, list(self.shape), self.kind, self.module_type]


@dataclass(frozen=True)
class Layout:
    """Ordered floating-point tensors of a model's ``state_dict``.

    entries: the tensors in ``state_dict`` order. Derived (not compared): ``size`` (P, total
    scalars), ``slices`` (read-only name -> ``slice`` into the vector), ``layout_id`` (32-byte
    sha256 of :meth:`canonical_json`) and ``layout_id_hex``.
    Two layouts are equal iff their entries are equal (iff their layout ids are equal).
    """

    entries: tuple[LayoutEntry, ...]
    size: int = field(init=False, compare=False)
    slices: Mapping[str, slice] = field(init=False, compare=False, repr=False)
    layout_id: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        entries = tuple(self.entries)
        object.__setattr__(self, "entries", entries)
        slices: dict[str, slice] = {}
        offset = 0
        for e in entries:
            if not isinstance(e, LayoutEntry):
                raise TypeError(f"Layout entries must be LayoutEntry, got {type(e).__name__}")
            if e.name in slices:
                raise ValueError(f"Layout: duplicate entry name {e.name!r}")
            slices[e.name] = slice(offset, offset + e.numel)
            offset += e.numel
        object.__setattr__(self, "size", offset)
        object.__setattr__(self, "slices", types.MappingProxyType(slices))
        object.__setattr__(self, "layout_id",
                           hashlib.sha256(self.canonical_json().encode("ascii")).digest())

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_module(cls, model: nn.Module) -> "Layout":
        """Layout of ``model.state_dict()``: every floating tensor, parameters and buffers.

        Integer/bool buffers (e.g. BatchNorm ``num_batches_tracked``) are excluded.
        """
        owner: dict[str, tuple[str, str]] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            prefix = mod_name + "." if mod_name else ""
            mtype = type(mod).__name__
            for pname in mod._parameters:
                owner.setdefault(prefix + pname, ("param", mtype))
            for bname in mod._buffers:
                owner.setdefault(prefix + bname, ("buffer", mtype))
        modules = dict(model.named_modules(remove_duplicate=False))
        entries = []
        for name, t in model.state_dict(keep_vars=True).items():
            if not (isinstance(t, torch.Tensor) and torch.is_floating_point(t)):
                continue
            if name in owner:
                kind, mtype = owner[name]
            else:  # extra state written by a custom _save_to_state_dict
                kind = "param" if isinstance(t, nn.Parameter) else "buffer"
                mod = modules.get(name.rpartition(".")[0])
                mtype = type(mod).__name__ if mod is not None else ""
            entries.append(LayoutEntry(name, tuple(t.shape), kind, mtype))
        if not entries:
            raise ValueError(f"{type(model).__name__} has no floating-point tensors in its "
                             "state_dict; nothing to lay out")
        return cls(tuple(entries))

    @classmethod
    def from_dict(cls, d: Mapping) -> "Layout":
        """Inverse of :meth:`to_dict`; checks the stored layout id if present."""
        if d.get("format") != _LAYOUT_FORMAT:
            raise ValueError(f"not a medchain layout (format {d.get('format')!r}, "
                             f"expected {_LAYOUT_FORMAT!r})")
        layout = cls(tuple(LayoutEntry(n, tuple(s), k, m) for n, s, k, m in d["entries"]))
        if "layout_id" in d and d["layout_id"] != layout.layout_id_hex:
            raise ValueError(f"layout id mismatch: stored {d['layout_id']}, "
                             f"recomputed {layout.layout_id_hex}")
        return layout

    # -- identity ----------------------------------------------------------------------------
    def canonical_json(self) -> str:
        """The exact string hashed into :attr:`layout_id` (ASCII, no spaces, sorted keys)."""
        return json.dumps({"entries": [e.to_json() for e in self.entries],
                           "format": _LAYOUT_FORMAT},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @property
    def layout_id_hex(self) -> str:
        return self.layout_id.hex()

    def to_dict(self) -> dict:
        """JSON-serializable description (for ``summary.json`` and :meth:`from_dict`)."""
        return {"format": _LAYOUT_FORMAT, "layout_id": self.layout_id_hex, "size": self.size,
                "entries": [e.to_json() for e in self.entries]}

    # -- lookup ------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def entry(self, name: str) -> LayoutEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"{name!r} is not in the layout (layout {self.layout_id_hex[:12]}, "
                       f"{len(self.entries)} entries)")

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (f"Layout({len(self.entries)} tensors, size={self.size}, "
                f"id={self.layout_id_hex[:12]}…)")


def _check_vector(vec, layout: Layout, what: str = "vector") -> np.ndarray:
    a = np.asarray(vec)
    if a.shape != (layout.size,):
        raise ValueError(f"{what} has shape {a.shape}, expected ({layout.size},) for "
                         f"layout {layout.layout_id_hex[:12]}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{what} must be floating point, got dtype {a.dtype}")
    return a


def flatten(state_dict: Mapping[str, torch.Tensor], layout: Layout) -> np.ndarray:
    """Concatenate the layout's tensors of ``state_dict`` into a new float32 array ``(P,)``.

    Raises ValueError if a layout tensor is missing or has another shape, or if ``state_dict``
    holds a floating tensor the layout does not know (a different architecture).
    """
    missing = [n for n in layout.names if n not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} tensor(s) of the layout, e.g. "
                         f"{missing[:3]}; was it made by the same model architecture?")
    extra = [n for n, t in state_dict.items() if n not in layout.slices
             and isinstance(t, torch.Tensor) and torch.is_floating_point(t)]
    if extra:
        raise ValueError(f"state_dict has {len(extra)} floating tensor(s) not in the layout, "
                         f"e.g. {extra[:3]}; build the layout from this model")
    parts = []
    for e in layout.entries:
        t = state_dict[e.name]
        if tuple(t.shape) != e.shape:
            raise ValueError(f"{e.name}: shape {tuple(t.shape)} differs from layout shape {e.shape}")
        parts.append(t.detach().to(device="cpu", dtype=torch.float32).reshape(-1))
    return torch.cat(parts).numpy().astype(np.float32, copy=False)


def unflatten(vec, layout: Layout,
              like: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`: a new ``state_dict`` (fresh tensors, CPU).

    With ``like``, the result has ``like``'s keys and order, each layout tensor in ``like``'s dtype,
    and every non-layout entry (integer buffers such as ``num_batches_tracked``) cloned from
    ``like``. Without it: only the layout tensors, float32.
    """
    a = np.ascontiguousarray(_check_vector(vec, layout), dtype=np.float32)
    flat = torch.from_numpy(a.copy())
    out: dict[str, torch.Tensor] = {}
    new = {e.name: flat[layout.slices[e.name]].reshape(e.shape) for e in layout.entries}
    if like is None:
        return new
    missing = [n for n in layout.names if n not in like]
    if missing:
        raise ValueError(f"`like` lacks layout tensors {missing[:3]}")
    for name, t in like.items():
        if name in new:
            if tuple(t.shape) != tuple(new[name].shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} in `like` differs from "
                                 f"layout shape {tuple(new[name].shape)}")
            out[name] = new[name].to(dtype=t.dtype).clone()
        elif isinstance(t, torch.Tensor):
            if torch.is_floating_point(t):
                raise ValueError(f"`like` has floating tensor {name!r} not in the layout")
            out[name] = t.detach().cpu().clone()
        else:
            out[name] = t
    return out


def load_flat(model: nn.Module, vec, layout: Layout | None = None) -> None:
    """Write ``vec`` into ``model`` in place (parameters keep their identity, so optimizers that
    hold them stay valid). Integer buffers are left as they are.

    layout: the layout ``vec`` was made with; checked against ``model``'s (default: the model's).
    """
    own = Layout.from_module(model)
    if layout is not None and layout != own:
        raise ValueError(f"vector layout {layout.layout_id_hex[:12]} differs from the model's "
                         f"layout {own.layout_id_hex[:12]}; the architectures do not match")
    a = np.ascontiguousarray(_check_vector(vec, own), dtype=np.float32)
    flat = torch.from_numpy(a)
    sd = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for e in own.entries:
            t = sd[e.name]
            t.copy_(flat[own.slices[e.name]].reshape(e.shape).to(device=t.device, dtype=t.dtype))


def model_vector(model: nn.Module, layout: Layout | None = None) -> np.ndarray:
    """The model's state as a new float32 vector ``(P,)`` (see :func:`flatten`)."""
    return flatten(model.state_dict(), layout if layout is not None else Layout.from_module(model))


def _patterns(p: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if p is None:
        return None
    if isinstance(p, str):
        return (p,)
    return tuple(p)


def select_names(layout: Layout, include: str | Iterable[str] | None = None,
                 exclude: str | Iterable[str] | None = None, *, strict: bool = False) -> np.ndarray:
    """Boolean mask ``(P,)`` of the coordinates whose tensor name matches a glob pattern.

    include: patterns (``fnmatch``, case-sensitive, e.g. ``"head.*"``, ``"*.running_*"``);
    None selects every tensor. exclude: patterns removed afterwards.
    strict: raise ValueError when a pattern matches no tensor (catches typos).
    """
    inc, exc = _patterns(include), _patterns(exclude)
    names = layout.names
    if strict:
        for p in (inc or ()) + (exc or ()):
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"pattern {p!r} matches no tensor; names are {list(names)}")
    mask = np.zeros(layout.size, dtype=bool)
    for n in names:
        keep = inc is None or any(fnmatch.fnmatchcase(n, p) for p in inc)
        if keep and exc is not None and any(fnmatch.fnmatchcase(n, p) for p in exc):
            keep = False
        if keep:
            mask[layout.slices[n]] = True
    return mask


def mask_for_module_types(layout: Layout, types: Iterable[str] = BATCHNORM_TYPES,
                          kinds: Iterable[str] = _KINDS) -> np.ndarray:
    """Boolean mask ``(P,)`` of the coordinates owned by modules of the given class names.

    types: module class names (default :data:`BATCHNORM_TYPES`). kinds: ``"param"``, ``"buffer"``
    or both (default).
    """
    types, kinds = frozenset(types), frozenset(kinds)
    bad = kinds - set(_KINDS)
    if bad:
        raise ValueError(f"unknown kinds {sorted(bad)}; use 'param' and/or 'buffer'")
    mask = np.zeros(layout.size, dtype=bool)
    for e in layout.entries:
        if e.module_type in types and e.kind in kinds:
            mask[layout.slices[e.name]] = True
    return mask


def digest_vector(vec, layout: Layout) -> bytes:
    """32-byte sha256 of ``layout_id || vec`` (vec as little-endian float32 bytes).

    The digest of a global model that institutions attest on chain. ``vec`` must be float32
    (any byte order) of shape ``(P,)``: other dtypes are refused rather than silently rounded.
    Deterministic across runs and platforms. (NaN payload bits are hashed as they are.)
    """
    a = _check_vector(vec, layout)
    if a.dtype.kind != "f" or a.dtype.itemsize != 4:
        raise TypeError(f"digest_vector needs a float32 vector, got {a.dtype}; convert explicitly")
    h = hashlib.sha256(layout.layout_id)
    h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return h.digest()
