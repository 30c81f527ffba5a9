"""Label-prior correction of the global model (logit adjustment, Menon et al. 2021: no training)
and the per-institution metrics (majority vote, balanced ACC undefined on a one-class split)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medchain.data.types import ImageSet
from medchain.metrics import classification_metrics
from medchain.training import evaluate


def label_frequencies(labels, n_classes: int, smoothing: float = 1.0) -> np.ndarray:
    """Class frequencies float64 ``(n_classes,)`` of int labels ``(N,)``, with additive
    (Laplace) smoothing: ``(count_c + smoothing) / (N + K·smoothing)``.

    smoothing > 0 keeps a class that an institution never saw at a finite log-frequency; with
    smoothing = 0 an absent class has frequency 0 (log = −inf: it is never predicted).
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), found [{y.min()}, {y.max()}]")
    if smoothing < 0 or not np.isfinite(smoothing):
        raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing}")
    counts = np.bincount(y, minlength=n_classes).astype(np.float64) + float(smoothing)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no labels and no smoothing: the frequencies are undefined")
    return counts / total


def prior_shift(local_freq, global_freq) -> np.ndarray:
    """The logit offset ``log local_freq − log global_freq``, float64 ``(K,)``.

    A class absent locally (frequency 0) gets −inf; a class absent from the global data
    (frequency 0) is an error (the global model never learnt it, there is nothing to correct)."""
    lf, gf = np.asarray(local_freq, np.float64), np.asarray(global_freq, np.float64)
    if lf.shape != gf.shape or lf.ndim != 1:
        raise ValueError(f"local and global frequencies must be (K,) vectors of equal length, "
                         f"got {lf.shape} and {gf.shape}")
    if (lf < 0).any() or (gf <= 0).any():
        raise ValueError("frequencies must be >= 0 locally and > 0 globally")
    with np.errstate(divide="ignore"):
        return np.log(lf) - np.log(gf)


def adjust_logits(logits, local_freq, global_freq) -> np.ndarray:
    """Label-prior corrected logits float64 ``(N, K)``: ``logits + log local − log global``."""
    z = np.asarray(logits, dtype=np.float64)
    shift = prior_shift(local_freq, global_freq)
    if z.ndim != 2 or z.shape[1] != shift.shape[0]:
        raise ValueError(f"logits must be (N, {shift.shape[0]}), got {z.shape}")
    return z + shift[None, :]


class LogitAdjusted(nn.Module):
    """``model`` whose logits are shifted by a fixed per-class offset (a buffer ``shift``, (K,)).
    Shares (does not copy) the wrapped model's weights."""

    def __init__(self, model: nn.Module, shift):
        super().__init__()
        self.model = model
        s = torch.as_tensor(np.asarray(shift, dtype=np.float64), dtype=torch.float32)
        self.register_buffer("shift", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + self.shift


def prior_corrected(model: nn.Module, local_labels, global_labels, n_classes: int, *,
                    smoothing: float = 1.0) -> LogitAdjusted:
    """The global ``model`` corrected to an institution's label prior (``global_prior``, for ACC;
    see module docstring). local_labels: the institution's training labels; global_labels: all
    institutions' training labels pooled (in a deployment: the sum of every institution's K
    class counts)."""
    shift = prior_shift(label_frequencies(local_labels, n_classes, smoothing),
                        label_frequencies(global_labels, n_classes, smoothing))
    return LogitAdjusted(model, shift)


def uniform_corrected(model: nn.Module, global_labels, n_classes: int, *,
                      smoothing: float = 1.0) -> LogitAdjusted:
    """The global ``model`` with the training prior removed (``global_uniform``, for balanced
    ACC): logits ``+ log(1/K) − log p_train``; the constant ``log(1/K)`` changes no decision and
    no probability. The same for every institution."""
    uniform = np.full(n_classes, 1.0 / n_classes)
    return LogitAdjusted(model, prior_shift(uniform, label_frequencies(global_labels, n_classes, smoothing)))


def undefined_balanced(metrics: dict, labels) -> dict:
    """`metrics` (a :func:`medchain.metrics.classification_metrics` dict of the split whose int
    labels are `labels`) with ``classes_in_test`` (how many classes occur) and ``balanced_acc``
    set to NaN when fewer than two occur: over one class balanced ACC is that class's recall (a
    majority vote scores 1.0), not a balanced measure. Over >= 2 present classes it is the mean
    recall of the classes present (scikit-learn drops classes absent from the labels)."""
    present = int(np.unique(np.asarray(labels)).size)
    out = {**metrics, "classes_in_test": present}
    if present < 2:
        out["balanced_acc"] = float("nan")
    return out


def split_metrics(model: nn.Module, data: ImageSet) -> dict:
    """:func:`medchain.training.evaluate` of `model` on `data`, through :func:`undefined_balanced`."""
    return undefined_balanced(evaluate(model, data), data.labels)


def majority_metrics(train_labels, test_labels, n_classes: int) -> dict[str, float]:
    """Metrics of always predicting the training majority class (ACC = the majority rate;
    balanced ACC = 1 / #classes in the test split if that class occurs there, else 0, and NaN
    when the split holds one class; AUC 0.5), with ``classes_in_test``."""
    maj = int(np.bincount(np.asarray(train_labels).astype(np.int64), minlength=n_classes).argmax())
    y = np.asarray(test_labels).astype(np.int64)
    proba = np.zeros((y.size, n_classes))
    proba[:, maj] = 1.0
    return undefined_balanced(classification_metrics(y, proba), y)
