"""Claim 4's numbers, verdicts and figures from :func:`~medchain.experiments.personalization.personalize_setting`
runs (notebooks/04_personalization.ipynb): per-institution tables (each metric read from the
model selected on it), gains and paired differences, the per-setting verdict
(:func:`setting_summary`), one seed's settings run and summarized (:func:`run_seed`), the
decisions over seeds (:func:`summarize_seeds`), and the gains figure."""
from __future__ import annotations

from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medchain import stats
from medchain.data import Dataset
from medchain.experiments.personalization import (COLORS, LABELS, NO_SELECTION, ORDER, SettingRun,
                                                  personalize_setting)
from medchain.personalize import MATCHING_REFERENCE, METHODS, SELECT_METRICS, FinetuneConfig
from medchain.protocol import CollabConfig


def per_institution(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """(setting, method, institution) × (acc, balanced_acc, auc, classes_in_test) on one split,
    each metric read from the model selected on it: ``acc`` from rows selected on ACC,
    ``balanced_acc`` and ``auc`` from rows selected on balanced ACC (rows with ``selected_on`` =
    ``"none"`` serve both). A table without ``selected_on`` (older runs) is read as is."""
    t = table[table.split == split]
    idx = ["setting", "method", "institution"]
    if "selected_on" not in t.columns:
        cols = [c for c in ("acc", "balanced_acc", "auc", "classes_in_test") if c in t.columns]
        return t.set_index(idx)[cols].sort_index()
    on_acc = t[t.selected_on.isin(("acc", NO_SELECTION))].set_index(idx)
    on_bal = t[t.selected_on.isin(("balanced_acc", NO_SELECTION))].set_index(idx)
    for name, part in (("acc", on_acc), ("balanced_acc", on_bal)):
        if part.index.has_duplicates:
            raise ValueError(f"table has several rows per (setting, method, institution) for {name}: "
                             "concatenate runs of different seeds with a distinct setting name or "
                             "pass one seed's table")
    out = on_bal[["balanced_acc", "auc", "classes_in_test"]].join(on_acc[["acc"]], how="outer")
    return out[["acc", "balanced_acc", "auc", "classes_in_test"]].sort_index()


def gains(table: pd.DataFrame, over: str = "global", split: str = "test") -> pd.DataFrame:
    """Per-institution gain of every method over the reference `over` (rows: setting, method,
    institution; columns: acc, balanced_acc, auc). over="matching": each metric over its own
    reference (:data:`medchain.personalize.MATCHING_REFERENCE`: ACC over ``global_prior``,
    balanced ACC and AUC over ``global_uniform``). NaN where balanced ACC is undefined."""
    p = per_institution(table, split)[["acc", "balanced_acc", "auc"]]
    if over == "matching":
        ref = pd.concat([p.xs(MATCHING_REFERENCE["acc"], level="method")[["acc"]],
                         p.xs(MATCHING_REFERENCE["balanced_acc"], level="method")[["balanced_acc", "auc"]]],
                        axis=1)
        skip = set(MATCHING_REFERENCE.values())
    else:
        ref = p.xs(over, level="method")
        skip = {over}
    out = []
    for (setting, method), g in p.groupby(level=["setting", "method"]):
        if method in skip:
            continue
        d = g.droplevel("method") - ref.loc[[setting]]
        out.append(d.assign(method=method).set_index("method", append=True))
    return pd.concat(out).reorder_levels(["setting", "method", "institution"]).sort_index()


def select_best(table: pd.DataFrame, setting: str, metric: str, methods=METHODS) -> str:
    """The personalization method with the highest mean per-institution *validation* `metric`
    (institutions where it is undefined skipped; ties: the earlier in `methods`)."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"metric must be one of {SELECT_METRICS}, got {metric!r}")
    val = per_institution(table[table.setting == setting], "val")
    present = [m for m in methods if m in val.index.get_level_values("method")]
    if not present:
        raise ValueError(f"setting {setting!r} has none of the methods {list(methods)}")
    def score(m: str) -> float:
        v = val.xs((setting, m))[metric].to_numpy(float)
        return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else -np.inf
    score = {m: score(m) for m in present}
    return max(present, key=lambda m: (score[m], -present.index(m)))


def paired_differences(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The per-institution paired differences that decide claim 4, for every setting in `table`.

    One row per (setting, metric, method, institution), metric in ("acc", "balanced_acc"),
    method in :data:`METHODS` (those run); columns:

    ``value``: the method's score (its model selected on `metric`); ``reference``: the matching
    reference's name (``global_prior`` for ACC, ``global_uniform`` for balanced ACC) and
    ``reference_value``; ``local_only_value`` (local-only selected on `metric`);
    ``minus_reference`` = value − reference_value; ``minus_local_only`` = value − local_only_value;
    ``best``: True for the method chosen on mean per-institution validation `metric`
    (:func:`select_best`) — ``d[d.best]`` is the verdict's "best personalization"; ``classes_in_test``.
    Balanced ACC rows of a one-class test split have NaN values and differences (drop them before
    pooling). To pool over seeds, add a ``seed`` column to each seed's frame and concatenate: the
    differences are paired within (seed, setting, institution).
    """
    p = per_institution(table, split)
    out = []
    for setting in dict.fromkeys(table.setting):
        have = set(p.xs(setting).index.get_level_values("method"))
        missing = {"local_only", *MATCHING_REFERENCE.values()} - have
        if missing:
            raise ValueError(f"setting {setting!r} lacks the references {sorted(missing)}")
        for metric in SELECT_METRICS:
            ref_name = MATCHING_REFERENCE[metric]
            ref = p.xs((setting, ref_name))[metric]
            loc = p.xs((setting, "local_only"))[metric]
            best = select_best(table, setting, metric)
            for method in (m for m in METHODS if m in have):
                v = p.xs((setting, method))
                for inst, value in v[metric].items():
                    out.append({"setting": setting, "metric": metric, "method": method, "institution": int(inst),
                                "value": float(value), "reference": ref_name,
                                "reference_value": float(ref[inst]), "local_only_value": float(loc[inst]),
                                "minus_reference": float(value - ref[inst]),
                                "minus_local_only": float(value - loc[inst]),
                                "best": method == best, "classes_in_test": int(v.classes_in_test[inst])})
    return pd.DataFrame(out, columns=["setting", "metric", "method", "institution", "value", "reference",
                                      "reference_value", "local_only_value", "minus_reference",
                                      "minus_local_only", "best", "classes_in_test"])


def _nanmin(x: pd.Series) -> float:
    return float(x.min()) if x.notna().any() else float("nan")


def _metric_verdict(run: SettingRun, out: dict, metric: str, margin: float, tolerance: float) -> dict:
    """The verdict on one metric: best method (on validation `metric`) vs its matching reference
    and local-only, on mean per-institution test `metric`, and the worst institution's change."""
    d = paired_differences(run.table)
    d = d[(d.setting == run.setting) & (d.metric == metric) & d.best]
    best = str(d.method.iloc[0])
    ref = MATCHING_REFERENCE[metric]
    key = "mean_balanced_acc" if metric == "balanced_acc" else "mean_acc"
    m = out["methods"]
    over_ref, over_loc = float(d.minus_reference.mean()), float(d.minus_local_only.mean())
    worst = _nanmin(d.minus_reference)
    eps = 1e-9
    return {"best_method": best, "selected_on": f"mean per-institution validation {metric}",
            "reference": ref, "best": m[best][key], "reference_value": m[ref][key],
            "local_only": m["local_only"][key],
            "gain_over_reference": over_ref, "gain_over_local_only": over_loc,
            "worst_institution_vs_reference": worst,
            "institutions_scored": int(d.minus_reference.notna().sum()),
            "holds": bool(over_ref >= margin - eps and over_loc >= margin - eps and worst >= -tolerance - eps)}


def setting_summary(run: SettingRun, *, margin: float = 0.02, tolerance: float = 0.01) -> dict:
    """Mean and worst-institution ACC / balanced ACC per method, gains over the references, and
    the verdict per metric (``by_metric``): the best personalization method, chosen on mean
    per-institution *validation* metric, beats the matching reference (``global_prior`` for ACC,
    ``global_uniform`` for balanced ACC) and local-only by >= `margin` of mean per-institution
    test metric, and no institution is more than `tolerance` worse than under that reference.
    ``holds`` / ``best_method`` are the balanced-ACC verdict's (the claim's metric); means skip
    institutions whose test split holds one class (balanced ACC undefined there)."""
    table = run.table
    test, val = per_institution(table, "test"), per_institution(table, "val")
    methods = [m for m in ORDER if m in test.index.get_level_values("method")]
    out: dict = {"institutions": len(run.institutions), "methods": {}}
    for m in methods:
        t, v = test.xs((run.setting, m)), val.xs((run.setting, m))
        out["methods"][m] = {
            "mean_acc": float(t.acc.mean()), "worst_acc": float(t.acc.min()),
            "mean_balanced_acc": float(t.balanced_acc.mean()),
            "worst_balanced_acc": _nanmin(t.balanced_acc),
            "mean_auc": float(t.auc.mean()),
            "val_mean_acc": float(v.acc.mean()),
            "val_mean_balanced_acc": float(v.balanced_acc.mean()),
            "institutions_balanced_acc": int(t.balanced_acc.notna().sum()),
            "per_institution": {"acc": t.acc.round(6).tolist(), "balanced_acc": t.balanced_acc.round(6).tolist(),
                                "auc": t.auc.round(6).tolist()},
        }
    for ref in ("global", "global_prior", "global_uniform", "matching"):
        g = gains(table, ref)
        for m in methods:
            if (setting_m := (run.setting, m)) not in g.index.droplevel("institution"):
                continue
            d = g.xs(setting_m)
            out["methods"][m][f"gain_over_{ref}"] = {
                "mean_acc": float(d.acc.mean()), "mean_balanced_acc": float(d.balanced_acc.mean()),
                "worst_acc": _nanmin(d.acc), "worst_balanced_acc": _nanmin(d.balanced_acc)}
    personal = [m for m in METHODS if m in out["methods"]]
    by_metric = {metric: _metric_verdict(run, out, metric, margin, tolerance) for metric in SELECT_METRICS}
    v = by_metric["balanced_acc"]
    best = v["best_method"]
    b = out["methods"][best]
    eps = 1e-9
    gl = b["gain_over_global"]
    out.update({
        "by_metric": by_metric,
        "best_method": best, "best_selected_on": v["selected_on"],
        "best_method_on_test": max(personal, key=lambda m: out["methods"][m]["mean_balanced_acc"]),
        "reference": v["reference"],
        "best_gain_over_reference": v["gain_over_reference"],
        "best_worst_institution_vs_reference": v["worst_institution_vs_reference"],
        "best_gain_over_local_only": v["gain_over_local_only"],
        "best_gain_over_global": gl["mean_balanced_acc"],
        # the local-prior correction, for comparison with runs before the matching references
        "best_gain_over_global_prior": b["gain_over_global_prior"]["mean_balanced_acc"],
        "best_worst_institution_vs_global_prior": b["gain_over_global_prior"]["worst_balanced_acc"],
        "holds": v["holds"],
        "holds_acc": by_metric["acc"]["holds"],
        # stricter: also against the uncorrected global model
        "best_worst_institution_vs_global": gl["worst_balanced_acc"],
        "holds_strict": bool(v["holds"] and gl["mean_balanced_acc"] >= margin - eps
                             and gl["worst_balanced_acc"] >= -tolerance - eps),
        "audits": {m: a.to_dict() for m, a in run.audits.items()},
        "local_coordinates_never_shared": all(a.ok for a in run.audits.values()),
        "ledger_address": {n: r.ledger_address for n, r in run.runs.items()},
        "chain_identity": {n: r.chain_identity for n, r in run.runs.items()},
        "final_block_hash": {n: r.final_block_hash for n, r in run.runs.items()},
        "final_global_digest": {n: r.final_digest.hex() for n, r in run.runs.items()},
        "personal_digests": {m: run.info[f"{m}_digests"] for m in personal},
        "train_label_counts": run.info["train_label_counts"],
        **{key: run.info[key] for key in ("n_train", "n_val", "n_test", "test_per_institution",
                                          "test_below_target", "test_label_counts")},
        "test_classes_absent": run.info.get("test_classes_absent"),
        "global_pooled_test": run.info.get("global_pooled_test"),
        "global_degenerate": (run.info.get("global_pooled_test") or {}).get("degenerate"),
        "test_one_class": run.info.get("test_one_class"),
        "wall_s": run.info["wall_s"], "cpu_s": run.info["cpu_s"],
    })
    return out


def run_seed(dataset: Dataset, *, seed: int, settings: list[str], cfg: CollabConfig,
             ft_all: FinetuneConfig, ft_head: FinetuneConfig, **kwargs) -> dict:
    """One seed of claim 4 over `settings` (partition, initialization, shuffling and fine-tuning
    drawn from `seed`), as plain data: {seed, table (every score row, tagged with the seed),
    summaries: {setting: setting_summary}, paired: paired_differences (tagged with the seed)}.
    kwargs go to :func:`personalize_setting`."""
    cfg = replace(cfg, seed=seed)
    ft_all, ft_head = replace(ft_all, seed=seed), replace(ft_head, seed=seed)
    tables, summaries = [], {}
    for setting in settings:
        run = personalize_setting(dataset, setting, cfg, ft_all=ft_all, ft_head=ft_head, **kwargs)
        tables.append(run.table)
        summaries[setting] = setting_summary(run)
    table = pd.concat(tables, ignore_index=True)
    return {"seed": seed, "table": table.assign(seed=seed), "summaries": summaries,
            "paired": paired_differences(table).assign(seed=seed)}


def summarize_seeds(seed_runs: list[dict], *, margin: float = 0.0, tolerance: float = 0.01) -> dict:
    """Claim 4 per setting over seeds. For each metric (balanced ACC decides; ACC reported) and
    each seed: the method selected on validation for that metric, its mean over institutions of
    (method − matching reference) and (method − local-only), paired within the seed; the claim
    holds when both have their 95 % interval above `margin`. The worst institution's change
    against the reference is reported with its interval (non-inferiority within `tolerance`).
    Institutions whose test split has one class have no balanced ACC and are skipped."""
    paired = pd.concat([r["paired"] for r in seed_runs], ignore_index=True)
    out = {}
    for setting in dict.fromkeys(paired.setting):
        decisions, chosen = [], {}
        for metric in ("balanced_acc", "acc"):
            d = paired[(paired.setting == setting) & (paired.metric == metric) & paired.best].dropna(
                subset=["minus_reference"])
            per_seed = d.groupby("seed").agg(over_ref=("minus_reference", "mean"),
                                             over_loc=("minus_local_only", "mean"),
                                             worst=("minus_reference", "min"), method=("method", "first"))
            ref = LABELS[MATCHING_REFERENCE[metric]]
            chosen[metric] = per_seed.method.tolist()
            if per_seed.empty:   # every institution's test split holds one class in every seed
                decisions += [_undefined(*spec) for spec in (
                    ("superiority", metric, "best personalization", ref, margin),
                    ("superiority", metric, "best personalization", "local only", margin),
                    ("non_inferiority", f"{metric}_worst_institution", "worst institution, best personalization",
                     ref, -tolerance))]
                continue
            decisions += [
                stats.superiority(per_seed.over_ref.to_numpy(), margin, metric=metric,
                                  a="best personalization", b=ref),
                stats.superiority(per_seed.over_loc.to_numpy(), margin, metric=metric,
                                  a="best personalization", b="local only"),
                stats.non_inferiority(per_seed.worst.to_numpy(), tolerance, metric=f"{metric}_worst_institution",
                                      a="worst institution, best personalization", b=ref)]
        v = stats.claim_verdict(
            f"claim 4 ({setting}): the best personalization (chosen on validation) beats the matching "
            "no-training reference and local-only in mean per-institution balanced ACC",
            decisions, deciding_metric="balanced_acc",
            why_metric="balanced ACC: institutions' label mixes differ, so plain ACC rewards predicting "
                       "each one's majority class; its reference removes the training prior (uniform prior)")
        degenerate = [bool(r["summaries"][setting].get("global_degenerate")) for r in seed_runs]
        if any(degenerate):
            v["detail"] += (f"; WARNING: the global model was degenerate in {sum(degenerate)} of "
                            f"{len(degenerate)} seeds")
        per = [r["summaries"][setting] for r in seed_runs]
        n_test = [n for p in per for n in p.get("n_test", [])]
        out[setting] = {"verdict": v, "best_method_per_seed": chosen, "global_degenerate": degenerate,
                        "test_sizes": {"min": min(n_test, default=None), "max": max(n_test, default=None),
                                       "per_seed": [p.get("n_test") for p in per],
                                       "below_target": sum(len(p.get("test_below_target") or []) for p in per),
                                       "institutions": len(n_test),
                                       "one_class": sum(len(p.get("test_one_class") or []) for p in per)},
                        "local_coordinates_never_shared": all(r["summaries"][setting]["local_coordinates_never_shared"]
                                                              for r in seed_runs)}
    return out


def _undefined(kind: str, metric: str, a: str, b: str, threshold: float) -> stats.Decision:
    """The decision where no seed has a value: inconclusive, with no numbers."""
    nan = float("nan")
    return stats.Decision(kind, metric, a, b, [], threshold, "inconclusive",
                          "undefined: every institution's test split holds one class in every seed "
                          "(balanced ACC is not computed over one class)", nan, nan, nan, nan, nan)


def verdict_detail(s: dict) -> str:
    """One line: the best method per metric against its matching reference and local-only."""
    parts = []
    for metric, name in (("balanced_acc", "bal. ACC"), ("acc", "ACC")):
        v = s["by_metric"][metric]
        parts.append(f"{name}: best {v['best_method']} {v['best']:.3f} vs {v['reference']} "
                     f"{v['reference_value']:.3f} ({v['gain_over_reference']:+.3f}), local-only "
                     f"{v['local_only']:.3f} ({v['gain_over_local_only']:+.3f}), worst institution "
                     f"{v['worst_institution_vs_reference']:+.3f} over {v['institutions_scored']} "
                     f"institutions — {'holds' if v['holds'] else 'fails'}")
    g = s["methods"]["global"]
    out = "; ".join(parts) + (f"; global {g['mean_balanced_acc']:.3f} bal. ACC / {g['mean_acc']:.3f} ACC; "
                              f"also vs uncorrected global: {'yes' if s['holds_strict'] else 'no'}")
    h = s.get("global_pooled_test")
    if h and h["degenerate"]:
        out += (f"; WARNING: the global model is degenerate (pooled test balanced ACC "
                f"{h['balanced_acc']:.3f}, predicted per class {h['predicted']} vs true {h['true']})")
    return out


def mean_table(table: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean and worst (min over institutions) ACC / balanced ACC, mean AUC, per setting × method
    (each metric from the model selected on it; balanced ACC over the institutions where it is
    defined, counted in ``n_bal_acc``)."""
    p = per_institution(table, split).reset_index()
    order = {m: i for i, m in enumerate(ORDER)}
    p["_o"] = p.method.map(lambda m: order.get(m, len(order)))
    p["_s"] = p.setting.map({s: i for i, s in enumerate(dict.fromkeys(table.setting))})
    p = p.sort_values(["_s", "_o", "institution"])
    g = p.groupby(["setting", "method"], sort=False)
    return pd.DataFrame({"mean_acc": g.acc.mean(), "worst_acc": g.acc.min(),
                         "mean_bal_acc": g.balanced_acc.mean(), "worst_bal_acc": g.balanced_acc.min(),
                         "n_bal_acc": g.balanced_acc.count(), "mean_auc": g.auc.mean()})


def plot_gains(table: pd.DataFrame, metric: str = "balanced_acc"):
    """Per-institution gain in `metric` of each personalization method (top row: over the global
    model; bottom row: over `metric`'s matching prior-corrected global model), one column per
    setting; that corrected model's own gain over the global model is drawn in grey on top."""
    ref_name = MATCHING_REFERENCE.get(metric, "global_prior")
    settings = list(dict.fromkeys(table.setting))
    fig, axes = plt.subplots(2, len(settings), figsize=(4.8 * len(settings), 6.4), squeeze=False)
    for col, setting in enumerate(settings):
        for row, ref in enumerate(("global", ref_name)):
            ax = axes[row][col]
            g = gains(table[table.setting == setting], ref)
            show = [m for m in ((ref_name,) if ref == "global" else ()) + METHODS
                    if m in g.index.get_level_values("method")]
            insts = sorted(set(g.index.get_level_values("institution")))
            width = 0.8 / max(len(show), 1)
            for j, m in enumerate(show):
                vals = g.xs((setting, m))[metric].reindex(insts).to_numpy()
                ax.bar(np.arange(len(insts)) + (j - (len(show) - 1) / 2) * width, vals, width,
                       color=COLORS.get(m, None), label=LABELS.get(m, m))
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xticks(np.arange(len(insts)), [str(i) for i in insts])
            ax.grid(axis="y", alpha=0.3)
            if row == 0:
                ax.set_title(f"setting: {setting}")
            if row == 1:
                ax.set_xlabel("institution")
            if col == 0:
                name = metric.replace("balanced_acc", "balanced ACC").replace("acc", "ACC")
                ax.set_ylabel(f"gain in {name}\nover {'global' if ref == 'global' else LABELS[ref_name].replace('global + ', 'global, ')}")
    handles, labels = {}, {}
    for ax in axes.ravel():
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig
