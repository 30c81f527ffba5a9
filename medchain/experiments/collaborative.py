"""Claim 1: collaborative training over the chain vs centralized training on pooled data vs each
institution alone, over several seeds. Used by notebooks/01_centralized_vs_collaborative.ipynb.

Fairness rules (the same for every method): the same model, optimizer, batch size and seed; the
same passes over the local data (baselines train rounds × local_epochs epochs unless told
otherwise, and the budgets are recorded); the same selection rule — every method keeps the model
(epoch, or round for the collaborative run) with the best validation accuracy, ties broken by the
lower validation loss, on validation data only. The collaborative run's selected round is one of
the global models whose digests every institution attested on chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medchain import stats
from medchain.baselines import centralized, local_only, pooled_test, score_rows
from medchain.data import Dataset, partition
from medchain.data.types import ImageSet
from medchain.params import load_flat
from medchain.protocol import CollabConfig, CollabResult, run_collaborative
from medchain.training import TrainConfig, evaluate, predict_proba, selection_key

METRICS = ("acc", "balanced_acc", "auc")
DECIDING_METRIC = "acc"
WHY_METRIC = ("ACC is the paper's measure; balanced ACC and AUC are decided the same way and "
              "reported beside it (a class-mix shift can move ACC alone)")


@dataclass
class PartitionRun:
    """Everything measured on one partition with one seed: tidy metric rows, learning curves, the
    chain run, and the collaborative model selected on validation data."""

    scheme: str
    rows: list[dict]
    curves: pd.DataFrame                     # method, institution, step, acc
    collab: CollabResult
    reference: CollabResult | None = None    # the chain-free FedAvg reference, when run
    extra: dict = field(default_factory=dict)


class _BestRound:
    """round_callback that scores each round's global model on the pooled validation split and
    keeps the best one (ACC, then lower loss) — the selection rule of the baselines' fit()."""

    def __init__(self, val: ImageSet):
        self.val, self.key, self.round, self.vec = val, None, 0, None

    def __call__(self, r: int, insts) -> None:
        model = insts[0].model      # holds round r's global model (run_collaborative loads it)
        m = evaluate(model, self.val)
        key = selection_key(m)
        if self.key is None or key > self.key:
            self.key, self.round = key, r + 1
            self.vec = insts[0].global_vec.copy()


def compare_on_partition(dataset: Dataset, scheme: str, cfg: CollabConfig, *, institutions: int = 5,
                         alpha: float = 0.5, centralized_epochs: int | None = None,
                         chain: str | None = "embedded", with_reference: bool = False,
                         quiet: bool = True) -> PartitionRun:
    """Partition `dataset` with cfg.seed, then train centralized, local-only and
    collaborative-on-chain with the same model, batch size, optimizer and seed. Centralized and
    local-only train for `centralized_epochs` (default: rounds × local_epochs, the same passes
    over the data as the collaborative run) with a cosine schedule; every method is selected on
    validation data (see the module docstring)."""
    insts = partition(dataset, None if scheme == "sites" else institutions, scheme, alpha=alpha, seed=cfg.seed)
    epochs = centralized_epochs or cfg.rounds * cfg.local_epochs
    tcfg = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                       weight_decay=cfg.weight_decay, lr_floor=cfg.lr_floor, seed=cfg.seed)
    cen = centralized(insts, cfg.model, dataset.n_classes, tcfg, quiet=quiet)
    loc = local_only(insts, cfg.model, dataset.n_classes, tcfg, quiet=quiet)
    best = _BestRound(ImageSet.concat([i.val for i in insts]))
    col = run_collaborative(insts, dataset.n_classes, cfg, chain=chain, quiet=quiet, round_callback=best)
    rows = [{**r, "partition": scheme} for r in cen.rows + loc.rows]
    rows += [{**r, "partition": scheme} for r in score_rows("collaborative_last_round", col.model, insts)]
    load_flat(col.model, best.vec, col.institutions[0].layout)
    rows += [{**r, "partition": scheme} for r in score_rows("collaborative", col.model, insts)]
    test = pooled_test(insts)
    correct = {name: predict_proba(m, test).argmax(1) == test.labels
               for name, m in (("centralized", cen.models[0]), ("collaborative", col.model))}
    curves = [{"method": "centralized", "institution": -1, "step": h["epoch"], "acc": h["track_acc"]}
              for h in cen.fits[0].history]
    for inst, f in zip(insts, loc.fits):
        curves += [{"method": "local_only", "institution": inst.index, "step": h["epoch"], "acc": h["track_acc"]}
                   for h in f.history]
    curves += [{"method": "collaborative", "institution": -1, "step": h["round"] * cfg.local_epochs,
                "acc": h["acc"]} for h in col.history]
    ref = None
    if with_reference and chain is not None:
        ref = run_collaborative(insts, dataset.n_classes, cfg, chain=None, quiet=quiet)
    return PartitionRun(scheme, rows, pd.DataFrame(curves).assign(partition=scheme), col, ref, extra={
        "passes": {"centralized": epochs, "local_only": epochs, "collaborative": cfg.rounds * cfg.local_epochs},
        "selection": {"rule": "best validation ACC, ties: lower validation loss",
                      "centralized_epoch": cen.fits[0].best_epoch,
                      "local_only_epochs": [f.best_epoch for f in loc.fits],
                      "collaborative_round": best.round,
                      "collaborative_round_digest": col.history[best.round - 1]["digest"]},
        "correct": correct})


def _pooled(rows: list[dict], method: str) -> dict[str, float]:
    """Pooled-test metrics of `method` (local-only: mean over the institutions' models)."""
    table = pd.DataFrame(rows)
    sel = table[(table.method == method) & (table.eval_on == "pooled")]
    return {m: float(sel[m].mean()) for m in METRICS}


def partition_summary(run: PartitionRun, tolerance: float) -> dict:
    """The numbers one seed contributes on one partition (no verdict: one seed decides nothing;
    see :func:`summarize`). Gaps are collaborative − centralized per metric."""
    cen, col, loc = (_pooled(run.rows, m) for m in ("centralized", "collaborative", "local_only"))
    accs = pd.Series({h["round"]: h["acc"] for h in run.collab.history})   # pooled test ACC by round
    reached = accs[accs >= cen["acc"] - tolerance]
    t = run.collab.timings
    out = {
        "seed": run.collab.institutions[0].cfg.seed,
        "centralized": cen, "collaborative": col, "local_only_mean": loc,
        "collaborative_last_round": _pooled(run.rows, "collaborative_last_round"),
        "gap_collaborative_minus_centralized": {m: col[m] - cen[m] for m in METRICS},
        "gain_over_local_only": {m: col[m] - loc[m] for m in METRICS},
        "gap_test_image_interval_95": list(stats.image_bootstrap(run.extra["correct"]["collaborative"],
                                                                 run.extra["correct"]["centralized"])),
        "rounds": int(len(run.collab.history)),
        "rounds_to_within_tolerance": int(reached.index[0]) if len(reached) else None,
        "passes_over_local_data": run.extra.get("passes"),
        "selection": run.extra.get("selection"),
        "final_global_digest": run.collab.final_digest.hex(),
        "ledger_address": run.collab.ledger_address,
        "chain_identity": run.collab.chain_identity,
        "final_block_hash": run.collab.final_block_hash,
        "wall_s": run.collab.wall_s,
        "timings_s": t,
        "chain_overhead_pct": 100.0 * t.get("chain", 0.0) / max(run.collab.wall_s, 1e-9),
    }
    if run.reference is not None:
        out["reference_digest_equal"] = run.reference.final_digest == run.collab.final_digest
        out["reference_wall_s"] = run.reference.wall_s
    return out


def run_seed(dataset: Dataset, scheme: str, cfg: CollabConfig, *, seed: int, tolerance: float,
             **kwargs) -> dict:
    """One seed of claim 1 on one partition, as plain data for :func:`summarize`:
    {"summary": partition_summary, "rows": [...], "curves": DataFrame}, every row tagged with the seed.
    kwargs go to :func:`compare_on_partition`."""
    run = compare_on_partition(dataset, scheme, replace(cfg, seed=seed), **kwargs)
    return {"summary": partition_summary(run, tolerance),
            "rows": [{**r, "seed": seed} for r in run.rows],
            "curves": run.curves.assign(seed=seed)}


def summarize(seed_runs: list[dict], tolerance: float, *, partition_name: str) -> dict:
    """Claim 1 on one partition over seeds: per-method mean ± interval of each metric, the paired
    decisions (collaborative vs centralized: non-inferiority within `tolerance`; collaborative vs
    mean local-only: superiority) on ACC, balanced ACC and AUC, and the verdict (decided on ACC)."""
    per_seed = [r["summary"] for r in seed_runs]
    methods = {m: {k: stats.describe([s[m][k] for s in per_seed]) for k in METRICS}
               for m in ("centralized", "collaborative", "local_only_mean", "collaborative_last_round")}
    decisions = []
    for k in METRICS:
        decisions.append(stats.non_inferiority([s["gap_collaborative_minus_centralized"][k] for s in per_seed],
                                               tolerance, metric=k, a="collaborative", b="centralized"))
        decisions.append(stats.superiority([s["gain_over_local_only"][k] for s in per_seed], 0.0,
                                           metric=k, a="collaborative", b="local-only mean"))
    v = stats.claim_verdict(f"claim 1 ({partition_name}): collaborative ≈ centralized and > local-only",
                            decisions, deciding_metric=DECIDING_METRIC, why_metric=WHY_METRIC)
    return {"seeds": [s["seed"] for s in per_seed], "methods": methods, "verdict": v,
            "per_seed": per_seed}


def plot_curves(curves: pd.DataFrame, summary: dict | None = None):
    """Pooled-test ACC vs passes over the local data, one panel per partition: mean over seeds
    with a ±1 SD band (collaborative, centralized, mean of the local-only models). Returns the figure."""
    parts = list(dict.fromkeys(curves.partition))
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 3.8), squeeze=False, sharey=True)
    n_seeds = curves["seed"].nunique() if "seed" in curves else 1
    for ax, part in zip(axes[0], parts):
        c = curves[curves.partition == part]
        for method, color in (("local_only", "tab:gray"), ("centralized", "tab:blue"),
                              ("collaborative", "tab:red")):
            g = c[c.method == method]
            if "seed" in g:   # local-only: average the institutions' models first, then over seeds
                g = g.groupby(["seed", "step"], as_index=False).acc.mean()
            band = g.groupby("step").acc.agg(["mean", "std"]).fillna(0.0)
            label = {"local_only": "local-only (mean)", "collaborative": "collaborative (on chain)"}.get(method, method)
            ax.plot(band.index, band["mean"], color=color, lw=2, label=label)
            ax.fill_between(band.index, band["mean"] - band["std"], band["mean"] + band["std"],
                            color=color, alpha=0.2, lw=0)
        ax.set_title(f"partition: {part} ({n_seeds} seed{'s' if n_seeds != 1 else ''}, band ±1 SD)")
        ax.set_xlabel("passes over local data (collaborative: round × local epochs)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (pooled)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_gaps(parts: dict[str, dict]):
    """Per-seed paired differences (points) with their 95 % interval (bar) for each partition and
    metric: collaborative − centralized (with the tolerance band) and collaborative − local-only."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for ax, (kind, title) in zip(axes[0], (("non_inferiority", "collaborative − centralized"),
                                           ("superiority", "collaborative − local-only mean"))):
        ticks = []
        for i, (part, s) in enumerate(parts.items()):
            for j, d in enumerate(x for x in s["verdict"]["decisions"] if x["kind"] == kind):
                pos = i * (len(METRICS) + 1) + j
                ticks.append((pos, f"{part}\n{d['metric']}"))
                vals = 100 * np.asarray(d["values"])
                ax.scatter(np.full(vals.size, pos), vals, s=12, color="k", zorder=3)
                if np.isfinite(d["ci_low"]):
                    ax.errorbar(pos, 100 * d["mean"], yerr=[[100 * (d["mean"] - d["ci_low"])],
                                [100 * (d["ci_high"] - d["mean"])]], fmt="o", color="tab:red", capsize=4)
                if kind == "non_inferiority":
                    ax.axhline(100 * d["threshold"], color="tab:orange", ls="--", lw=1)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks([p for p, _ in ticks], [t for _, t in ticks], fontsize=7)
        ax.set_ylabel("difference (points)")
        ax.set_title(title + " (95 % interval)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
