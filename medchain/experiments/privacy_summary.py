"""Claim 2's numbers, verdict and figures from the seeds of :func:`medchain.experiments.privacy.run_seed`.

Leakage is judged per patient, against what an attacker knows without any update:

* re-identification — the rank of the true image among every training image by similarity to the
  reconstruction (:func:`medchain.metrics.reidentification_rank`); its *percentile*
  ``1 − (rank − 1)/(N − 1)`` is 0.5 on average by chance and 1 for a perfect match; the rank-1 rate
  is compared with chance ``1/N``;
* PSNR and SSIM per image, the median and the worst (most revealing) image, beside the same numbers
  of the data set's mean image on the same images.

The verdict (:func:`summarize_seeds`) decides, over seeds, for one defence against no defence:
ACC non-inferior within ``acc_tolerance``; the attack working on the unprotected update (mean
re-identification percentile above chance — else no protection can be shown); and the defence's
re-identification no better than chance within ``reid_tolerance``.
"""
from __future__ import annotations

import math
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from scipy.stats import binomtest

from medchain import stats

__all__ = ["leakage_table", "proportion", "summarize_seeds", "plot_frontier", "plot_leakage", "plot_membership",
           "plot_reconstructions"]


def _concat(runs: list[dict], key: str) -> pd.DataFrame:
    return pd.concat([r[key] for r in runs], ignore_index=True)


def proportion(k: int, n: int, level: float = stats.LEVEL) -> dict:
    """{k, n, rate, ci_low, ci_high}: k successes of n with the exact Clopper–Pearson interval."""
    if n < 1:
        return {"k": int(k), "n": int(n), "rate": None, "ci_low": None, "ci_high": None}
    ci = binomtest(int(k), int(n)).proportion_ci(level, method="exact")
    return {"k": int(k), "n": int(n), "rate": k / n, "ci_low": float(ci.low), "ci_high": float(ci.high)}


def _best_attack(leak: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, defence): the rows of the attack with the highest mean re-identification
    percentile over all images and seeds — the attacker's strongest method."""
    means = leak.groupby(["setting", "defence", "attack"]).reid_percentile.mean().reset_index()
    best = means.loc[means.groupby(["setting", "defence"]).reid_percentile.idxmax()]
    return leak.merge(best[["setting", "defence", "attack"]], on=["setting", "defence", "attack"])


def leakage_table(leak: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, defence) for its strongest attack: n_images, median / worst PSNR and
    SSIM, the mean image's median / worst PSNR on the same images, rank-1 and top-1 % rates, chance
    (1/N) with the rank-1 rate's Clopper–Pearson interval, and the mean re-identification
    percentile (0.5 = chance)."""
    rows = []
    for (setting, defence), g in _best_attack(leak).groupby(["setting", "defence"], sort=False):
        n = int(g.pool_size.iloc[0])
        rows.append({"setting": setting, "defence": defence, "attack": g.attack.iloc[0], "n_images": len(g),
                     "psnr_median": float(g.psnr.median()), "psnr_worst": float(g.psnr.max()),
                     "ssim_median": float(g.ssim.median()), "ssim_worst": float(g.ssim.max()),
                     "mean_image_psnr_median": float(g.mean_psnr.median()),
                     "mean_image_psnr_worst": float(g.mean_psnr.max()),
                     "mean_image_ssim_median": float(g.mean_ssim.median()),
                     "rank_median": float(g["rank"].median()), "rank_best": int(g["rank"].min()),
                     "reid_rank1_rate": float((g["rank"] == 1).mean()),
                     **{f"reid_rank1_{k}": v for k, v in proportion(int((g["rank"] == 1).sum()), len(g)).items()
                        if k in ("ci_low", "ci_high")},
                     "reid_top1pct_rate": float((g["rank"] <= max(1, math.ceil(0.01 * n))).mean()),
                     "chance_rank1": 1.0 / n, "pool_size": n,
                     "reid_percentile_mean": float(g.reid_percentile.mean())})
    return pd.DataFrame(rows)


def _per_seed(df: pd.DataFrame, defence: str, column: str) -> pd.Series:
    return df[df.defence == defence].groupby("seed")[column].mean()


def summarize_seeds(seed_runs: list[dict], *, decide: str = "partial_largest", reference: str = "none",
                    acc_tolerance: float = 0.02, reid_tolerance: float = 0.05,
                    references: dict | None = None) -> dict:
    """Claim 2 over seeds for defence ``decide`` against ``reference`` (no defence).

    Decisions (:mod:`medchain.stats`, paired by seed): ACC, balanced ACC, AUC of ``decide`` −
    ``reference`` non-inferior within ``acc_tolerance`` (ACC decides); ``attack_check``: the
    strongest protocol attack's mean re-identification percentile on ``reference`` above 0.5
    (chance); ``reid``: 0.5 − the percentile on ``decide`` non-inferior within ``reid_tolerance``
    (no better than chance) — inconclusive whenever the attack check does not hold, and then the
    check itself does not decide (a broken attack shows nothing either way).
    ``references``: defence → its own model's no-defence run for the ACC cost in ``per_defence``
    (default: ``reference`` for all). Membership rows with member counts (``tp@1%fpr``) also get
    the TPR pooled over seeds and rounds with its Clopper–Pearson interval.
    Returns {verdict, per_defence, leakage (table rows), decide, reference, ...}.
    """
    u, leak, mia = _concat(seed_runs, "utility"), _concat(seed_runs, "leak"), _concat(seed_runs, "mia")
    for name in (decide, reference):
        if name not in set(u.defence):
            raise ValueError(f"defence {name!r} was not run; have {sorted(set(u.defence))}")
    proto = _best_attack(leak[leak.setting == "protocol"])
    decisions = []
    for metric in ("acc", "balanced_acc", "auc"):
        a, b = _per_seed(u, decide, metric), _per_seed(u, reference, metric)
        decisions.append(stats.non_inferiority((a - b).to_numpy(), acc_tolerance, metric=metric,
                                               a=decide, b=reference))
    ref_pct = _per_seed(proto, reference, "reid_percentile")
    check = stats.superiority((ref_pct - 0.5).to_numpy(), 0.0, metric="attack_check",
                              a=f"re-identification percentile on {reference}", b="chance (0.5)")
    pct = _per_seed(proto, decide, "reid_percentile")
    reid = stats.non_inferiority((0.5 - pct).to_numpy(), reid_tolerance, metric="reid",
                                 a="chance (0.5)", b=f"re-identification percentile on {decide}")
    if check.verdict != "holds" and reid.verdict == "holds":
        reid = replace(reid, verdict="inconclusive",
                       reason=f"the attack does not re-identify the unprotected update above chance "
                              f"({check.reason}): no protection can be shown")
    decisions += [check, reid]
    verdict = stats.claim_verdict(
        f"claim 2 ({decide}): the defence leaves re-identification of a patient from the posted update no "
        f"better than chance (within {100 * reid_tolerance:g} percentile points) at ≤ {100 * acc_tolerance:g} "
        f"points of ACC cost against {reference}",
        # an attack that fails on the unprotected update cannot make the claim fail: it leaves the
        # protection unshown (reid inconclusive above), unless the defence's own update leaks
        decisions, deciding_metric=("acc", "attack_check", "reid") if check.verdict == "holds" else ("acc", "reid"),
        why_metric="ACC for the cost; re-identification of the true patient among all training images for the "
                   "leakage (judged against chance), after checking that the attack works on the unprotected update")
    table = leakage_table(leak)
    per_defence = {}
    for name, g in u.groupby("defence", sort=False):
        d = {m: stats.describe(g.sort_values("seed")[m].to_numpy()) for m in ("acc", "balanced_acc", "auc")}
        d["settings"] = {k: g[k].iloc[0] for k in ("model", "optimizer", "lr", "theta_u", "select_rule", "gamma",
                                                    "sigma", "bn_stats", "dp_epsilon") if k in g}
        if "dp_epsilon_spent" in g and g.dp_epsilon_spent.notna().any():
            d["dp"] = {"epsilon_spent_max": float(g.dp_epsilon_spent.max()),
                       "noise_multiplier_mean": float(g.dp_noise_multiplier.mean())}
        d["values_per_update"] = float(g.values_per_update.mean())
        d["bn_values_per_update"] = float(g.bn_values_per_update.mean())
        ref = (references or {}).get(name, reference)
        d["reference"] = ref
        if ref is not None and name != ref and ref in set(u.defence):
            diff = (_per_seed(u, name, "acc") - _per_seed(u, ref, "acc")).to_numpy()
            d["acc_minus_reference"] = stats.describe(diff)
        t = table[(table.setting == "protocol") & (table.defence == name)]
        d["leakage"] = t.iloc[0].to_dict() if len(t) else None
        p = _per_seed(proto, name, "reid_percentile")
        d["reid_percentile"] = stats.describe(p.to_numpy()) if len(p) else None
        m = mia[mia.defence == name]
        d["mia"] = {a: {**{k: stats.describe(h.groupby("seed")[k].mean().to_numpy())
                           for k in ("auc", "tpr@1%fpr", "tpr@0.1%fpr")},
                        "auc_max": float(h.auc.max()), "n_attacks": int(len(h)),
                        **({f"pooled_tpr@{f}fpr": proportion(int(h[f"tp@{f}fpr"].sum()), int(h.n_members.sum()))
                            for f in ("1%", "0.1%")} if "tp@1%fpr" in h and h["tp@1%fpr"].notna().all() else {}),
                        **({"n_shadow": int(h.n_shadow.iloc[0])} if "n_shadow" in h and h.n_shadow.notna().all() else {})}
                    for a, h in m.groupby("attack")}
        per_defence[name] = d
    return {"verdict": verdict, "decide": decide, "reference": reference, "per_defence": per_defence,
            "leakage": table.to_dict("records")}


# --------------------------------------------------------------------------------------------
# figures

def plot_frontier(utility: pd.DataFrame, leak: pd.DataFrame, task_model: str = "cnn"):
    """Privacy–utility frontier, one point per defence (same chain and seeds): ACC (mean and 95 % t
    interval over seeds) against (a) the mean re-identification percentile (0.5 = chance) and (b)
    the median per-image PSNR (the mean image's median as a line). Circles: the task's model (the
    BatchNorm cnn); squares: any other model (DP-SGD's family and its no-defence reference)."""
    table = leakage_table(leak[leak.setting == "protocol"]).set_index("defence")
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0))
    for name, g in utility.groupby("defence", sort=False):
        if name not in table.index:
            continue
        d = stats.describe(g.acc.to_numpy())
        err = None if not np.isfinite(d["ci_low"]) else [[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]]
        model = g.model.iloc[0] if "model" in g else ""
        fmt = "o" if model == task_model else "s"
        for ax, x in zip(axes, (table.loc[name, "reid_percentile_mean"], table.loc[name, "psnr_median"])):
            ax.errorbar([x], [d["mean"]], yerr=err, fmt=fmt, capsize=3, label=f"{name} ({model})" if model else name)
            ax.annotate(name, (x, d["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].axvline(0.5, color="gray", ls="--", lw=0.8, label="chance")
    axes[0].set_xlabel("re-identification percentile (0.5 chance, 1 = the patient)")
    axes[1].axvline(float(table.mean_image_psnr_median.median()), color="gray", ls="--", lw=0.8,
                    label="mean image")
    axes[1].set_xlabel("median PSNR of the reconstructions (dB)")
    for ax in axes:
        ax.set_ylabel("pooled test ACC (95 % interval over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    others = sorted({str(m) for m in utility.get("model", pd.Series(dtype=str)).unique()} - {task_model})
    fig.suptitle(f"privacy–utility frontier: the protocol's updates of the trained models (○ {task_model}"
                 + (f", □ {', '.join(others)})" if others else ")"), fontsize=10)
    fig.tight_layout()
    return fig


def plot_leakage(leak: pd.DataFrame):
    """Per-image distribution per defence (strongest attack): re-identification percentile and PSNR,
    with chance and the mean image's PSNR; the worst-case LeNet bound in its own colour."""
    best = _best_attack(leak)
    names = list(dict.fromkeys(best.setting + "/" + best.defence))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.8))
    for ax, col in zip(axes, ("reid_percentile", "psnr")):
        data = [best[(best.setting + "/" + best.defence) == n][col].to_numpy() for n in names]
        ax.boxplot(data, vert=False, tick_labels=names)
        for i, v in enumerate(data):
            ax.plot(v, np.full(v.size, i + 1), ".", alpha=0.5, color="C1")
        ax.grid(alpha=0.3)
    axes[0].axvline(0.5, color="gray", ls="--", lw=0.8)
    axes[0].set_xlabel("re-identification percentile per image (0.5 = chance)")
    axes[1].axvline(float(leak.mean_psnr.median()), color="gray", ls="--", lw=0.8)
    axes[1].set_xlabel("PSNR per image (dB); dashed: mean image")
    fig.tight_layout()
    return fig


def plot_membership(mia: pd.DataFrame):
    """Membership-inference AUC and TPR at 1 % FPR per defence and attack (final global model;
    per-round updates averaged over rounds and institutions)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    g = mia.groupby(["defence", "attack"], sort=False)[["auc", "tpr@1%fpr"]].mean().reset_index()
    labels = g.defence + "/" + g.attack
    y = np.arange(len(g))
    ax.barh(y - 0.2, g.auc, height=0.4, label="AUC")
    ax.barh(y + 0.2, g["tpr@1%fpr"], height=0.4, label="TPR@1%FPR")
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0.5, color="gray", lw=0.8)
    ax.set_title("membership inference (loss: final model; update_loss: posted updates)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_reconstructions(recon: dict, max_images: int = 4):
    """Originals (top row) and the reconstruction of each (defence, attack) below."""
    if not recon:
        raise ValueError("no reconstructions kept (run_seed(keep_recon=True))")
    keys = list(recon)
    orig = recon[keys[0]][0][:max_images]
    n = len(orig)
    fig, axes = plt.subplots(len(keys) + 1, n, figsize=(1.4 * n + 2.2, 1.3 * (len(keys) + 1)), squeeze=False)
    rows = [("original", orig)] + [(f"{d}/{a}", recon[(d, a)][1][:max_images]) for d, a in keys]
    for i, (name, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=6, rotation=0, ha="right")
    fig.tight_layout()
    return fig
