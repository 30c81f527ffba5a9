"""Classification metrics, computed with scikit-learn (one place for all of them).

scikit-learn is imported on first use, not with this module: training imports it, and a node
process should reach its first training step without paying for sklearn's import (~1 s)."""
from __future__ import annotations

import warnings

import numpy as np


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """ACC, balanced ACC, AUC and mean cross-entropy (nats) of predicted probabilities.

    y_true: int (N,); proba: float (N, C) rows summing to 1. AUC is macro one-vs-rest over the
    classes present; binary tasks use the positive-class score. AUC is NaN when y_true holds a
    single class (it is undefined there), never an error.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss

    y_true = np.asarray(y_true).astype(np.int64).ravel()
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != y_true.shape[0]:
        raise ValueError(f"proba must be (N, C) with N = {y_true.shape[0]}, got {proba.shape}")
    if not np.isfinite(proba).all():
        raise ValueError("predicted probabilities contain NaN/Inf: the model diverged (lower the "
                         "learning rate or server momentum, or check the updates it was built from)")
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
    from sklearn.metrics import roc_auc_score

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


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of the top-label confidence: sum over equal-width confidence
    bins of (share of images in the bin) × |accuracy − mean confidence| in it; 0 is calibrated,
    in [0, 1]. y_true: int (N,); proba: (N, C). The reliability curve (per-bin accuracy and
    confidence) is scikit-learn's ``calibration_curve``; the bin weights use its binning."""
    from sklearn.calibration import calibration_curve

    y_true = np.asarray(y_true).astype(np.int64).ravel()
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != y_true.shape[0] or y_true.size == 0:
        raise ValueError(f"proba must be (N, C) with N = {y_true.shape[0]} > 0, got {proba.shape}")
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.int64)
    if correct.min() == correct.max():      # one outcome only: calibration_curve needs both
        return float(abs(correct[0] - conf.mean()))
    acc, mean_conf = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(bins[1:-1], conf), minlength=n_bins)   # sklearn's bin ids
    weights = counts[counts > 0] / conf.size
    return float(np.sum(weights * np.abs(acc - mean_conf)))


def majority_rate(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent training class on test_labels."""
    majority = np.bincount(np.asarray(train_labels).ravel()).argmax()
    return float(np.mean(np.asarray(test_labels).ravel() == majority))


# --------------------------------------------------------------------------------------------
# image reconstruction metrics (gradient-inversion attacks, medchain.attacks)

def _as_image_batch(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim not in (3, 4):
        raise ValueError(f"{name} must be a batch of images (B, H, W) or (B, H, W, C), "
                         f"got shape {a.shape}")
    return a.astype(np.float64)


def image_mse(a, b) -> np.ndarray:
    """Mean squared error per image, float64 (B,). a, b: (B, H, W[, C]) in the same units."""
    a, b = _as_image_batch(a, "a"), _as_image_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {a.shape} vs {b.shape}")
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)


def psnr(a, b, data_range: float = 255.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image, float64 (B,): 10·log10(range² / MSE)
    (inf for identical images). data_range: the images' value range (255 for uint8)."""
    m = image_mse(a, b)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / m)


def ssim(a, b, data_range: float = 255.0) -> np.ndarray:
    """Structural similarity per image (scikit-image ``structural_similarity``, default 7×7
    window, Gaussian weighting off), float64 (B,). Colour images (B, H, W, C): channel-averaged."""
    from skimage.metrics import structural_similarity
    a, b = _as_image_batch(a, "a"), _as_image_batch(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {a.shape} vs {b.shape}")
    kw = {"channel_axis": -1} if a.ndim == 4 else {}
    return np.array([structural_similarity(x, y, data_range=float(data_range), **kw)
                     for x, y in zip(a, b)], dtype=np.float64)


def match_reconstructions(recon, originals) -> np.ndarray:
    """Pair each original with one reconstruction (Hungarian assignment on MSE, scipy's
    ``linear_sum_assignment``): returns int64 (B,) ``perm`` with ``recon[perm[i]]`` matched to
    ``originals[i]``. A batch attack recovers images in no particular order; score after matching."""
    from scipy.optimize import linear_sum_assignment
    r, o = _as_image_batch(recon, "recon"), _as_image_batch(originals, "originals")
    if r.shape != o.shape:
        raise ValueError(f"recon {r.shape} and originals {o.shape} differ in shape")
    rf, of = r.reshape(r.shape[0], -1), o.reshape(o.shape[0], -1)
    cost = ((of[:, None, :] - rf[None, :, :]) ** 2).mean(axis=2)     # (originals, recon)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(o.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def reconstruction_metrics(recon, originals, data_range: float = 255.0, *,
                           recon_labels=None, labels=None, match: bool = True) -> dict:
    """Score a batch of reconstructions against the originals.

    recon, originals: (B, H, W[, C]) in the same units (uint8 images: data_range 255).
    match: pair them first with :func:`match_reconstructions` (a batch attack's order is arbitrary).
    recon_labels / labels: int (B,), optional; gives ``label_acc`` (after matching) and
    ``label_count_acc`` (order-free: Σ_c min(n̂_c, n_c) / B).
    Returns {"psnr", "ssim", "mse" (batch means), "psnr_each", "ssim_each", "mse_each" (lists),
    "perm" (list), and the label scores when labels are given}.
    """
    perm = match_reconstructions(recon, originals) if match else np.arange(len(originals))
    r = np.asarray(recon)[perm]
    p, s, m = psnr(r, originals, data_range), ssim(r, originals, data_range), image_mse(r, originals)
    out = {"psnr": float(np.mean(p)), "ssim": float(np.mean(s)), "mse": float(np.mean(m)),
           "psnr_each": p.tolist(), "ssim_each": s.tolist(), "mse_each": m.tolist(),
           "perm": perm.tolist()}
    if recon_labels is not None and labels is not None:
        rl = np.asarray(recon_labels).astype(np.int64).ravel()
        tl = np.asarray(labels).astype(np.int64).ravel()
        out["label_acc"] = float(np.mean(rl[perm] == tl))
        k = int(max(rl.max(initial=0), tl.max(initial=0))) + 1
        out["label_count_acc"] = float(np.minimum(np.bincount(rl, minlength=k),
                                                  np.bincount(tl, minlength=k)).sum() / tl.size)
    return out


def reidentification_rank(recon, true_index, pool, reference=None) -> np.ndarray:
    """Re-identification: the rank (1 = best) of each reconstruction's true image among a
    candidate ``pool`` of patients, by the absolute Pearson correlation between the reconstruction
    and each candidate, both taken relative to ``reference`` (the population's mean image; default
    the pool's mean). Correlation ignores the brightness / contrast a BatchNorm network cannot
    reveal, its absolute value a reconstruction with inverted contrast (an attacker tries both);
    subtracting the mean image leaves what is specific to a patient, so the mean image itself
    re-identifies no one (it ties with every candidate and ranks last).

    recon: (B, H, W[, C]); true_index: int (B,) positions in ``pool`` (N, H, W[, C]).
    Returns int64 (B,) ranks in 1..N (ties count against the attacker: rank = 1 + number of
    candidates at least as similar as the true image, other than itself).
    """
    r = _as_image_batch(recon, "recon").astype(np.float64)
    p = _as_image_batch(pool, "pool").astype(np.float64)
    t = np.asarray(true_index, dtype=np.int64).ravel()
    if r.shape[1:] != p.shape[1:] or t.size != r.shape[0]:
        raise ValueError(f"need recon (B, ...), true_index (B,) and pool (N, ...) of the same image "
                         f"shape; got {r.shape}, {t.shape}, {p.shape}")
    if t.size and (t.min() < 0 or t.max() >= p.shape[0]):
        raise ValueError(f"true_index must lie in [0, {p.shape[0]}), got {t.min()}..{t.max()}")
    ref = p.mean(0) if reference is None else np.asarray(reference, dtype=np.float64)
    rf = (r - ref).reshape(r.shape[0], -1)
    pf = (p - ref).reshape(p.shape[0], -1)
    rf = rf - rf.mean(1, keepdims=True)
    pf = pf - pf.mean(1, keepdims=True)
    rf /= np.linalg.norm(rf, axis=1, keepdims=True) + 1e-12
    pf /= np.linalg.norm(pf, axis=1, keepdims=True) + 1e-12
    sim = np.abs(rf @ pf.T)                                           # (B, N)
    own = sim[np.arange(t.size), t]
    ahead = (sim >= own[:, None]).sum(1) - 1                          # others at least as similar
    return (1 + ahead).astype(np.int64)
