"""Membership inference on a shared model: was this image in some institution's training data?

Everyone on a task's chain holds the global model, so everyone can run these attacks on it.

* :func:`loss_attack` — Yeom et al. (CSF 2018): training examples have lower loss; the score is
  ``−loss``. With ``threshold`` (Yeom's choice: the model's mean training loss, which a task often
  publishes) it also reports the membership advantage ``TPR − FPR`` of the decision
  ``loss <= threshold``.
* :func:`lira_attack` — LiRA (Carlini et al., S&P 2022), small: ``n_shadow`` shadow models, each
  trained on a random half of a population (the candidates plus optional auxiliary images) so that
  every example is *in* for half of them and *out* for the other half; per example a Gaussian fit
  of the logit-scaled confidence ``φ = log p_y − log(1 − p_y)`` (computed stably from the logits)
  in each group, score = likelihood ratio (online), or the one-sided out-only test (offline).
  With few shadows the variance is pooled over examples (``fix_variance=True``, as the paper does
  for small numbers of shadow models).

Both return :class:`MIAResult`: ROC AUC and TPR at 1 % and 0.1 % FPR (scikit-learn ``roc_curve``;
TPR at FPR ≤ x is the best TPR among thresholds whose FPR does not exceed x — with fewer than 1/x
non-members that is the TPR at zero false positives).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

from medchain.data.types import ImageSet
from medchain.training import to_tensor

__all__ = ["MIAResult", "mia_metrics", "per_example_loss", "logit_confidence", "loss_attack",
           "lira_scores", "lira_attack", "update_loss_attack"]

FPRS = (0.01, 0.001)


@dataclass
class MIAResult:
    """scores: float64 (N,), higher = more likely a member; is_member: bool (N,) ground truth.
    auc, tpr (FPR level → TPR), extra (attack-specific numbers, e.g. Yeom's advantage)."""

    attack: str
    scores: np.ndarray = field(repr=False)
    is_member: np.ndarray = field(repr=False)
    auc: float
    tpr: dict
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Flat row: attack, auc, tpr@1%fpr, tpr@0.1%fpr, n_members, n_nonmembers, extras."""
        row = {"attack": self.attack, "auc": self.auc,
               **{f"tpr@{100 * k:g}%fpr": v for k, v in self.tpr.items()},
               "n_members": int(self.is_member.sum()),
               "n_nonmembers": int((~self.is_member).sum())}
        row.update(self.extra)
        return row


def mia_metrics(scores, is_member, fprs=FPRS) -> tuple[float, dict]:
    """(ROC AUC, {fpr: TPR at FPR <= fpr}) of membership scores (higher = member)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = np.asarray(is_member).astype(bool).ravel()
    if s.shape != m.shape:
        raise ValueError(f"scores {s.shape} and is_member {m.shape} differ in shape")
    if m.all() or not m.any():
        raise ValueError("need both members and non-members to score an attack")
    if not np.isfinite(s).all():
        raise ValueError("membership scores contain NaN/Inf")
    fpr, tpr, _ = roc_curve(m, s)
    return float(roc_auc_score(m, s)), {f: float(tpr[fpr <= f].max()) for f in fprs}


@torch.no_grad()
def _logits(model: nn.Module, data: ImageSet, batch_size: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    out = [model(to_tensor(data.images[i:i + batch_size])).double()
           for i in range(0, len(data), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros((0, 0), dtype=torch.float64)


def per_example_loss(model: nn.Module, data: ImageSet, batch_size: int = 512) -> np.ndarray:
    """Cross-entropy (nats) of each example, float64 (N,), model in eval mode."""
    z = _logits(model, data, batch_size)
    return F.cross_entropy(z, torch.from_numpy(data.labels.astype(np.int64)),
                           reduction="none").numpy()


def logit_confidence(model: nn.Module, data: ImageSet, batch_size: int = 512) -> np.ndarray:
    """LiRA's logit-scaled confidence ``log p_y − log(1 − p_y) = z_y − logsumexp_{c≠y} z_c``,
    float64 (N,)."""
    z = _logits(model, data, batch_size)
    y = torch.from_numpy(data.labels.astype(np.int64))
    zy = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], float("-inf"))
    return (zy - torch.logsumexp(others, dim=1)).numpy()


def loss_attack(model: nn.Module, members: ImageSet, nonmembers: ImageSet, *,
                threshold: float | None = None) -> MIAResult:
    """Yeom et al.'s loss attack: score = −loss. threshold: decide "member" when loss <= threshold
    and report that decision's ``advantage`` (TPR − FPR), ``tpr_at_threshold``, ``fpr_at_threshold``."""
    lm, ln = per_example_loss(model, members), per_example_loss(model, nonmembers)
    scores = -np.concatenate([lm, ln])
    is_member = np.concatenate([np.ones(lm.size, bool), np.zeros(ln.size, bool)])
    auc, tpr = mia_metrics(scores, is_member)
    extra = {"mean_loss_members": float(lm.mean()), "mean_loss_nonmembers": float(ln.mean())}
    if threshold is not None:
        t, f = float(np.mean(lm <= threshold)), float(np.mean(ln <= threshold))
        extra.update(threshold=float(threshold), tpr_at_threshold=t, fpr_at_threshold=f,
                     advantage=t - f)
    return MIAResult("loss", scores, is_member, auc, tpr, extra)


def lira_scores(target_conf, shadow_conf, shadow_in, *, online: bool = True,
                fix_variance: bool = True) -> np.ndarray:
    """LiRA scores from confidences (higher = member).

    target_conf: float (N,), φ of the target model on each candidate. shadow_conf: float (S, N), φ of
    each shadow model. shadow_in: bool (S, N), whether the candidate was in that shadow's training set.
    online: likelihood ratio of the in- and out-Gaussians; offline: ``log Φ((φ − μ_out)/σ_out)``.
    fix_variance: one pooled σ per group instead of one per example (for few shadows).
    """
    t = np.asarray(target_conf, dtype=np.float64)
    c = np.asarray(shadow_conf, dtype=np.float64)
    inn = np.asarray(shadow_in).astype(bool)
    if c.shape != inn.shape or c.ndim != 2 or c.shape[1] != t.size:
        raise ValueError(f"need target_conf (N,), shadow_conf and shadow_in (S, N); got "
                         f"{t.shape}, {c.shape}, {inn.shape}")

    def fit(sel: np.ndarray):
        n = sel.sum(0)
        if (n == 0).any():
            raise ValueError(f"{int((n == 0).sum())} candidate(s) have no "
                             f"{'in' if sel is inn else 'out'} shadow model; use more shadows")
        mu = np.where(sel, c, 0).sum(0) / n
        dev = np.where(sel, (c - mu) ** 2, 0)
        if fix_variance:
            sd = np.full(t.size, np.sqrt(dev.sum() / max(1, sel.sum() - 1)))
        else:
            sd = np.sqrt(dev.sum(0) / np.maximum(1, n - 1))
        return mu, np.maximum(sd, 1e-6)

    mu_out, sd_out = fit(~inn)
    if not online:
        return norm.logcdf(t, mu_out, sd_out)
    mu_in, sd_in = fit(inn)
    return norm.logpdf(t, mu_in, sd_in) - norm.logpdf(t, mu_out, sd_out)


def lira_attack(model: nn.Module, candidates: ImageSet, is_member, *,
                train_fn: Callable[[ImageSet, int], nn.Module], population: ImageSet | None = None,
                n_shadow: int = 8, online: bool = True, fix_variance: bool = True,
                seed: int = 0) -> MIAResult:
    """LiRA against ``model`` on ``candidates`` (ground truth ``is_member``, bool (N,), for scoring).

    train_fn(data, seed) -> a trained model: the attacker's copy of the task's training recipe.
    population: auxiliary images from the same distribution; shadow models train on random halves of
    ``candidates ∪ population`` (each candidate in exactly ``n_shadow // 2`` of them).
    Costs ``n_shadow`` trainings. extra: ``n_shadow``, ``online``.
    """
    is_member = np.asarray(is_member).astype(bool)
    if is_member.shape != (len(candidates),):
        raise ValueError(f"is_member must be bool ({len(candidates)},), got {is_member.shape}")
    if n_shadow < 2:
        raise ValueError(f"need at least 2 shadow models, got {n_shadow}")
    pool = candidates if population is None else ImageSet.concat(
        [ImageSet(candidates.images, candidates.labels), ImageSet(population.images, population.labels)])
    rng = np.random.default_rng(seed)
    keep = np.argsort(rng.random((n_shadow, len(pool))), axis=0) < n_shadow // 2
    conf = np.zeros((n_shadow, len(candidates)))
    for s in range(n_shadow):
        shadow = train_fn(pool.subset(np.flatnonzero(keep[s])), seed * 1000 + s)
        conf[s] = logit_confidence(shadow, candidates)
    scores = lira_scores(logit_confidence(model, candidates), conf, keep[:, :len(candidates)],
                         online=online, fix_variance=fix_variance)
    auc, tpr = mia_metrics(scores, is_member)
    return MIAResult("lira" if online else "lira-offline", scores, is_member, auc, tpr,
                     {"n_shadow": n_shadow, "online": online})


def update_loss_attack(model: nn.Module, before: np.ndarray, after: np.ndarray, members: ImageSet,
                       nonmembers: ImageSet) -> MIAResult:
    """Membership inference on one posted update (a loss-difference attack): score = loss under
    the global model the round started from (``before``, float32 (P,)) − loss under the model the
    update reveals (``after`` = before + the decoded Δ on its revealed coordinates). The images an
    institution trained on that round lose more loss than others. ``model``: a module of the task's
    architecture (its weights are not used; a copy is loaded). extra: mean loss drops."""
    import copy

    from medchain.params import Layout, load_flat

    m = copy.deepcopy(model)
    layout = Layout.from_module(m)
    load_flat(m, np.asarray(before, np.float32), layout)
    lb_m, lb_n = per_example_loss(m, members), per_example_loss(m, nonmembers)
    load_flat(m, np.asarray(after, np.float32), layout)
    la_m, la_n = per_example_loss(m, members), per_example_loss(m, nonmembers)
    scores = np.concatenate([lb_m - la_m, lb_n - la_n])
    scores = np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
    is_member = np.concatenate([np.ones(len(members), bool), np.zeros(len(nonmembers), bool)])
    auc, tpr = mia_metrics(scores, is_member)
    return MIAResult("update_loss", scores, is_member, auc, tpr,
                     {"loss_drop_members": float(np.mean(lb_m - la_m)),
                      "loss_drop_nonmembers": float(np.mean(lb_n - la_n))})
