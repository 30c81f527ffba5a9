"""How a task on chain B uses auxiliary information from a similar task on chain A.

The source task's global model arrives as a flat float32 vector over the *source* layout
(:mod:`medchain.crosschain`: :func:`~medchain.crosschain.receive` then
:func:`~medchain.crosschain.parse_model_payload`). The target task may classify another number of
classes, so the classifier head is never transferred; the feature extractor is, in one of two ways:

* **warm start** (:func:`warm_start`): copy the source's feature tensors (every floating tensor except
  those matching ``exclude``, BatchNorm running statistics included) into the target model before
  training;
* **L2-SP** (:func:`l2sp_anchor`; Li, Grandvalet & Davoine, "Explicit inductive bias for transfer
  learning with convolutional networks", ICML 2018): keep the target's weights near the source's
  during training with the penalty ``(β/2)·Σ‖w − w_source‖²`` over the feature parameters — pass
  the anchor to :func:`medchain.training.train_epochs` / :func:`~medchain.training.fit` as
  ``anchor=``, with ``anchor_strength=β``. (The original L2-SP also decays the new head toward zero;
  use the optimizer's ``weight_decay`` for that.)

Both need the source and target feature extractors to be the same architecture: every transferable
tensor must exist on both sides with the same shape. Anything else is refused with a ValueError that
names the first mismatching tensor and both shapes (another architecture, another number of input
channels, another width).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from medchain.params import Layout

__all__ = ["DEFAULT_EXCLUDE", "compatible_entries", "transfer_plan", "warm_start", "l2sp_anchor"]

#: Tensors never transferred: the classifier head (its shape depends on the number of classes).
DEFAULT_EXCLUDE: tuple[str, ...] = ("head.*",)


def _patterns(p: str | Iterable[str] | None) -> tuple[str, ...]:
    if p is None:
        return ()
    return (p,) if isinstance(p, str) else tuple(p)


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def compatible_entries(source_layout: Layout, target_layout: Layout,
                       exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE) -> list[str]:
    """Names (in target order) of the tensors not matching ``exclude`` that both layouts hold with
    the same shape."""
    pats = _patterns(exclude)
    src = {e.name: e.shape for e in source_layout.entries}
    return [e.name for e in target_layout.entries
            if not _excluded(e.name, pats) and src.get(e.name) == e.shape]


def transfer_plan(source_layout: Layout, target_layout: Layout,
                  exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE) -> list[str]:
    """The tensors to transfer: every tensor not matching ``exclude``, which must be present with
    the same shape on both sides. Raises ValueError otherwise, naming the first mismatching tensor
    and both shapes, or when nothing is left to transfer."""
    pats = _patterns(exclude)
    src = {e.name: e.shape for e in source_layout.entries if not _excluded(e.name, pats)}
    tgt = {e.name: e.shape for e in target_layout.entries if not _excluded(e.name, pats)}
    if not src or not tgt:
        side = "source" if not src else "target"
        raise ValueError(f"nothing to transfer: every tensor of the {side} model matches exclude="
                         f"{list(pats)}; the feature extractor must lie outside the excluded names")
    hint = ("the source and target feature extractors differ (another architecture, number of "
            "input channels or width?); transfer needs the same feature extractor on both tasks")
    for e in target_layout.entries:
        if e.name not in tgt:
            continue
        if e.name not in src:
            raise ValueError(f"cannot transfer: the target's feature tensor {e.name!r} {e.shape} has no "
                             f"counterpart in the source model; {hint}")
        if src[e.name] != e.shape:
            raise ValueError(f"cannot transfer: feature tensor {e.name!r} has shape {src[e.name]} in the "
                             f"source model but {e.shape} in the target model; {hint}")
    extra = [n for n in src if n not in tgt]
    if extra:
        raise ValueError(f"cannot transfer: the source's feature tensor {extra[0]!r} {src[extra[0]]} has no "
                         f"counterpart in the target model ({len(extra)} such tensor(s)); {hint}")
    return [e.name for e in target_layout.entries if e.name in tgt]


def _source_tensors(source_vector, source_layout: Layout, names: list[str]) -> dict[str, torch.Tensor]:
    a = np.asarray(source_vector)
    if a.shape != (source_layout.size,):
        raise ValueError(f"the source vector has shape {a.shape}, expected ({source_layout.size},) for "
                         f"the source layout {source_layout.layout_id_hex[:12]}…")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"the source vector must be floating point, got {a.dtype}")
    flat = torch.from_numpy(np.array(a, dtype=np.float32))
    out = {}
    for n in names:
        t = flat[source_layout.slices[n]].reshape(source_layout.entry(n).shape)
        if not torch.isfinite(t).all():
            raise ValueError(f"the source model's tensor {n!r} holds non-finite values; refusing to transfer")
        out[n] = t
    return out


def warm_start(target_model: nn.Module, source_vector, source_layout: Layout,
               exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE) -> list[str]:
    """Copy the source model's feature extractor into ``target_model`` in place.

    source_vector: float32 ``(P_source,)`` over ``source_layout`` (the source task's global model).
    Every floating tensor of the target not matching ``exclude`` — weights, biases and BatchNorm
    running statistics — is overwritten with the source's; the excluded ones (by default the
    classifier head ``head.*``) and integer buffers (``num_batches_tracked``) are left untouched.
    Returns the names copied, in target order. Raises ValueError (naming the first mismatching
    tensor and both shapes) unless every feature tensor is compatible; nothing is changed then.
    """
    target_layout = Layout.from_module(target_model)
    names = transfer_plan(source_layout, target_layout, exclude)
    src = _source_tensors(source_vector, source_layout, names)
    sd = target_model.state_dict(keep_vars=True)
    with torch.no_grad():
        for n in names:
            t = sd[n]
            t.copy_(src[n].to(device=t.device, dtype=t.dtype))
    return names


def l2sp_anchor(source_vector, source_layout: Layout, target_model: nn.Module,
                exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE) -> dict[str, torch.Tensor]:
    """The L2-SP anchor: ``{parameter name: source tensor}`` for every trainable feature parameter
    of ``target_model`` (the head excluded), in the target's dtype and device, detached.

    Pass it to :func:`medchain.training.train_epochs` (or ``fit``) as ``anchor=`` with
    ``anchor_strength=β``: training then minimizes ``loss + (β/2)·Σ‖w − w_source‖²``. The same
    compatibility rules as :func:`warm_start` apply (ValueError otherwise). Buffers (BatchNorm
    statistics) are not anchored: they are not trained by gradient.
    """
    target_layout = Layout.from_module(target_model)
    names = transfer_plan(source_layout, target_layout, exclude)
    params = dict(target_model.named_parameters())
    anchored = [n for n in names if n in params and params[n].requires_grad]
    if not anchored:
        raise ValueError("nothing to anchor: the transferable tensors hold no trainable parameter")
    src = _source_tensors(source_vector, source_layout, anchored)
    return {n: src[n].to(device=params[n].device, dtype=params[n].dtype).detach().clone() for n in anchored}
