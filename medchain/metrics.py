"""Classification metrics, computed with scikit-learn (one place for all of them)."""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """ACC, balanced ACC, AUC and mean cross-entropy (nats) of predicted probabilities.

    y_true: int (N,); proba: float (N, C) rows summing to 1. AUC is macro one-vs-rest over the
    classes present; binary tasks use the positive-class score. AUC is NaN when y_true holds a
    single class (it is undefined there), never an error.
    """
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != y_true.shape[0]:
        raise ValueError(f"proba must be (N, C) with N = {y_true.shape[0]}, got {proba.shape}")
    n_classes = proba.shape[1]
    pred = proba.argmax(axis=1)
    clipped = np.clip(proba, 1e-12, 1.0)
    out = {
        "acc": float(accuracy_score(y_true, pred)),
        "loss": float(log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True),
                               labels=np.arange(n_classes))),
        "n": int(y_true.shape[0]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" on tiny splits
        out["balanced_acc"] = float(balanced_accuracy_score(y_true, pred))
    out["auc"] = auc_score(y_true, proba)
    return out


def auc_score(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over classes present in y_true (binary: positive-class score)."""
    present = np.unique(y_true)
    if present.size < 2:
        return float("nan")
    if proba.shape[1] == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    if present.size < proba.shape[1]:
        # Only the classes that occur can be scored one-vs-rest.
        scores = [roc_auc_score(y_true == c, proba[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(y_true, proba, multi_class="ovr", average="macro",
                               labels=np.arange(proba.shape[1])))


def majority_rate(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent training class on test_labels."""
    majority = np.bincount(np.asarray(train_labels).ravel()).argmax()
    return float(np.mean(np.asarray(test_labels).ravel() == majority))
