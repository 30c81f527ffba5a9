"""What a gradient-inversion attacker extracts from a payload (:mod:`medchain.attacks.inversion`):
the gradient estimate on the revealed coordinates, the BatchNorm statistics the payload reveals,
and the labels (iDLG's sign rule)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medchain import codec
from medchain.attacks.cases import PublicInfo
from medchain.params import Layout

__all__ = ["NothingToInvert", "Target", "decode_target", "recover_labels"]


class NothingToInvert(ValueError):
    """The payload reveals no coordinate of a trainable parameter to this attacker (e.g. a tiny θu
    whose top-k holds only BatchNorm running statistics): there is no gradient to match."""


# --------------------------------------------------------------------------------------------
# what the attacker extracts from the payload

@dataclass
class Target:
    """The attacker's view of one update: per model parameter (layout order) the estimated
    gradient ``−Δ/(lr·steps)`` (0 where not revealed) and the bool mask of revealed coordinates;
    ``bn_stats``: per BatchNorm module whose running statistics the payload reveals,
    ``(mean (C,), var (C,), revealed (C,) bool)`` = global statistics + Δ, i.e. the institution's
    statistics after the round (with BN recalibration: the exact per-channel moments of its images'
    activations, Yin et al. 2021's prior)."""

    names: list[str]
    grads: list[torch.Tensor]
    revealed: list[torch.Tensor]
    bn_stats: dict = field(default_factory=dict)

    @property
    def revealed_fraction(self) -> float:
        n = sum(int(m.sum()) for m in self.revealed)
        return n / max(1, sum(m.numel() for m in self.revealed))

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in self.names:
            return None
        i = self.names.index(name)
        return self.grads[i], self.revealed[i]


def decode_target(payload: bytes, public: PublicInfo,
                  model: nn.Module | None = None, layout: Layout | None = None) -> Target:
    """Decode ``payload`` exactly as a chain member does (strict :func:`medchain.codec.decode_update`
    against the task's layout) and turn it into the gradient estimate the attacks match."""
    if model is None or layout is None:
        model, layout = public.build()
    dec = codec.decode_update(payload, expected_layout_id=layout.layout_id,
                              expected_size=layout.size)
    scale = -1.0 / (public.lr * max(1, public.local_steps))
    full = np.zeros(layout.size, dtype=np.float64)
    full[dec.indices] = dec.values.astype(np.float64) * scale
    mask = dec.mask()
    names, grads, revealed = [], [], []
    for name, p in model.named_parameters():
        if name not in layout.slices:
            continue
        s = layout.slices[name]
        names.append(name)
        grads.append(torch.from_numpy(full[s].astype(np.float32)).reshape(p.shape))
        revealed.append(torch.from_numpy(mask[s].copy()).reshape(p.shape))
    after = public.global_vec.astype(np.float64).copy()
    after[dec.indices] += dec.values.astype(np.float64)
    bn_stats = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            continue
        mean_s = layout.slices.get(f"{mod_name}.running_mean")
        var_s = layout.slices.get(f"{mod_name}.running_var")
        if mean_s is None or var_s is None:
            continue
        seen = mask[mean_s] & mask[var_s]
        if seen.any():
            bn_stats[mod_name] = (torch.from_numpy(after[mean_s].astype(np.float32)),
                                  torch.from_numpy(after[var_s].astype(np.float32)),
                                  torch.from_numpy(seen.copy()))
    return Target(names, grads, revealed, bn_stats)


def recover_labels(target: Target, n_images: int, num_classes: int,
                   head: str = "head") -> np.ndarray | None:
    """Labels from the sign of the last layer's gradient (iDLG), or None when undetermined.

    For cross-entropy, ∂L/∂b_c = mean_i (p_ic − y_ic) and the row c of ∂L/∂W has that sign too when
    the head's inputs are non-negative (sigmoid / ReLU features, as in medchain's models): classes
    present in the batch show negative scores. Per class the score is the revealed bias gradient,
    else the sum of the revealed entries of its weight row. One image: the single negative class
    (or, if none is negative, the single class with nothing revealed). B images (a heuristic
    extension): every negative class at least once, the rest shared in proportion to −score.
    Returns int64 (n_images,) sorted, or None.
    """
    w = target.get(f"{head}.weight")
    b = target.get(f"{head}.bias")
    score = np.full(num_classes, np.nan)
    kind = np.zeros(num_classes, dtype=np.int64)        # 2: bias, 1: weight row, 0: unknown
    for c in range(num_classes):
        if b is not None and bool(b[1][c]):
            score[c], kind[c] = float(b[0][c]), 2
        elif w is not None and bool(w[1][c].any()):
            score[c], kind[c] = float(w[0][c][w[1][c]].double().sum()), 1
    known = ~np.isnan(score)
    if not known.any():
        return None
    neg = np.flatnonzero(known & (score < 0))
    if neg.size == 0:
        unknown = np.flatnonzero(~known)
        if n_images == 1 and unknown.size == 1:
            return unknown.astype(np.int64)
        return None
    if n_images == 1:
        # comparable scores only within one kind; prefer the bias
        best_kind = kind[neg].max()
        cand = neg[kind[neg] == best_kind]
        return np.array([cand[np.argmin(score[cand])]], dtype=np.int64)
    order = neg[np.argsort(score[neg], kind="stable")]       # most negative first
    if order.size >= n_images:
        return np.sort(order[:n_images]).astype(np.int64)
    weight = -score[order] / (-score[order]).sum()
    counts = np.ones(order.size, dtype=np.int64)
    extra = n_images - order.size
    share = weight * extra
    counts += np.floor(share).astype(np.int64)
    rest = n_images - counts.sum()
    if rest > 0:
        counts[np.argsort(-(share - np.floor(share)), kind="stable")[:rest]] += 1
    return np.sort(np.repeat(order, counts)).astype(np.int64)
