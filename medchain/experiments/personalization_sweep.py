"""Claim 4 across heterogeneity: where does personalization pay?

Reads the per-setting decisions of :func:`medchain.experiments.personalization_summary.summarize_seeds`
(paired over seeds: best personalization − matching reference, − local-only, and the worst
institution's change against the reference) and lays them out against the heterogeneity of the
split: a table, the settings where each comparison holds, and a plot with 95 % intervals.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medchain.experiments.personalization import parse_setting

#: The three comparisons of each metric, as named in the sweep table.
COMPARISONS = ("over_reference", "over_local_only", "worst_institution")
_SHOW = {"over_reference": ("best − matching reference", "tab:red", "o"),
         "over_local_only": ("best − local only", "tab:blue", "s"),
         "worst_institution": ("worst institution − matching reference", "tab:gray", "v")}


def heterogeneity_label(setting: str) -> str:
    """A setting in words for axes and tables: "dirichlet:0.1" → "Dirichlet α=0.1"."""
    spec = parse_setting(setting)
    scheme = spec["scheme"]
    if "alpha" in spec:
        return f"{'Dirichlet' if scheme == 'dirichlet' else scheme} α={spec['alpha']:g}"
    if scheme == "quantity":
        return f"quantity skew σ={spec.get('quantity_sigma', 1.0):g}"
    return {"sites": "natural sites", "iid": "IID"}[scheme]


def _comparison(d: dict, metric: str) -> str | None:
    if d["metric"] == f"{metric}_worst_institution":
        return "worst_institution"
    if d["metric"] == metric and d["kind"] == "superiority":
        return "over_local_only" if d["b"] == "local only" else "over_reference"
    return None


def sweep_table(decided: dict) -> pd.DataFrame:
    """One row per (setting, metric, comparison): heterogeneity (words), mean, ci_low, ci_high
    (95 % t interval over seeds, in metric units), n (seeds), verdict. `decided`: the output of
    ``summarize_seeds`` (settings in its order)."""
    rows = []
    for setting, s in decided.items():
        for metric in ("balanced_acc", "acc"):
            for d in s["verdict"]["decisions"]:
                comp = _comparison(d, metric)
                if comp is None:
                    continue
                rows.append({"setting": setting, "heterogeneity": heterogeneity_label(setting), "metric": metric,
                             "comparison": comp, "mean": _num(d.get("mean")), "ci_low": _num(d.get("ci_low")),
                             "ci_high": _num(d.get("ci_high")), "n": len(d.get("values") or []),
                             "verdict": d["verdict"]})
    return pd.DataFrame(rows, columns=["setting", "heterogeneity", "metric", "comparison", "mean", "ci_low",
                                       "ci_high", "n", "verdict"])


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def where_it_pays(decided: dict, metric: str = "balanced_acc") -> dict:
    """For `metric`, the settings (in order) where the best personalization beats the matching
    reference, beats local-only, both, where the worst institution is non-inferior to the
    reference, where a superiority fails, and where it is not shown to beat both (``not_both``)."""
    t = sweep_table(decided)
    t = t[t.metric == metric]
    def holds(comp: str, verdict: str = "holds") -> list[str]:
        return t[(t.comparison == comp) & (t.verdict == verdict)].setting.tolist()
    ref, loc = holds("over_reference"), holds("over_local_only")
    return {"metric": metric, "beats_reference": ref, "beats_local_only": loc,
            "beats_both": [s for s in ref if s in loc],
            "worst_institution_non_inferior": holds("worst_institution"),
            "fails_reference": holds("over_reference", "fails"), "fails_local_only": holds("over_local_only", "fails"),
            "not_both": [s for s in decided if s not in ref or s not in loc]}


def plot_sweep(decided: dict):
    """The paired gains (points, mean and 95 % interval over seeds) against heterogeneity, one
    panel per metric (balanced ACC decides, ACC reported); filled markers: the comparison holds."""
    t = sweep_table(decided)
    settings = list(decided)
    fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 1.5 * len(settings) * 2), 4.2), squeeze=False)
    for ax, metric, name in zip(axes[0], ("balanced_acc", "acc"), ("balanced ACC (decides)", "ACC")):
        for j, comp in enumerate(COMPARISONS):
            label, color, marker = _SHOW[comp]
            part = t[(t.metric == metric) & (t.comparison == comp)].set_index("setting").reindex(settings)
            x = np.arange(len(settings)) + (j - 1) * 0.2
            mean = 100 * part["mean"].to_numpy(float)
            lo, hi = 100 * part.ci_low.to_numpy(float), 100 * part.ci_high.to_numpy(float)
            err = np.vstack([np.where(np.isfinite(lo), mean - lo, 0), np.where(np.isfinite(hi), hi - mean, 0)])
            ax.errorbar(x, mean, yerr=err, fmt="none", ecolor=color, capsize=3, lw=1)
            held = (part.verdict == "holds").to_numpy()
            ax.scatter(x[held], mean[held], color=color, marker=marker, zorder=3, label=label)
            ax.scatter(x[~held], mean[~held], facecolors="white", edgecolors=color, marker=marker, zorder=3,
                       label=f"{label} (not shown to hold)" if (~held).any() else None)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(settings)), [heterogeneity_label(s) for s in settings], rotation=30, ha="right")
        ax.set_title(name)
        ax.set_ylabel("paired difference, points (95 % CI over seeds)")
        ax.grid(axis="y", alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("Claim 4 against heterogeneity: more skew to the left; filled: holds at 95 %")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def sweep_sentence(where: dict) -> str:
    """One line for a reader: where personalization beats the matching reference and local-only."""
    def names(xs: list[str]) -> str:
        return ", ".join(heterogeneity_label(s) for s in xs) or "none"
    return (f"{where['metric']}: beats the matching reference at {names(where['beats_reference'])}; "
            f"beats local-only at {names(where['beats_local_only'])}; both at {names(where['beats_both'])}")


__all__ = ["COMPARISONS", "heterogeneity_label", "plot_sweep", "sweep_sentence", "sweep_table",
           "where_it_pays"]
