"""Claim 1: collaborative training over the chain vs centralized training on pooled data vs each
institution alone. Used by notebooks/01_centralized_vs_collaborative.ipynb."""
from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medchain.baselines import centralized, local_only, mean_local_only, score_rows
from medchain.data import Dataset, partition
from medchain.protocol import CollabConfig, CollabResult, run_collaborative
from medchain.training import TrainConfig


@dataclass
class PartitionRun:
    """Everything measured on one partition: tidy metric rows, learning curves, the chain run."""

    scheme: str
    rows: list[dict]
    curves: pd.DataFrame                     # method, institution, step, acc
    collab: CollabResult
    reference: CollabResult | None = None    # the chain-free FedAvg reference, when run
    extra: dict = field(default_factory=dict)


def compare_on_partition(dataset: Dataset, scheme: str, cfg: CollabConfig, *, institutions: int = 5,
                         alpha: float = 0.5, centralized_epochs: int | None = None,
                         chain: str | None = "embedded", with_reference: bool = False,
                         quiet: bool = True) -> PartitionRun:
    """Partition `dataset`, then train centralized, local-only and collaborative-on-chain with the
    same model, batch size, optimizer and seed. Centralized and local-only train for
    `centralized_epochs` (default: rounds × local_epochs, the same passes over the data as the
    collaborative run) with a cosine schedule and validation-based selection."""
    insts = partition(dataset, None if scheme == "sites" else institutions, scheme, alpha=alpha, seed=cfg.seed)
    epochs = centralized_epochs or cfg.rounds * cfg.local_epochs
    tcfg = TrainConfig(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                       weight_decay=cfg.weight_decay, lr_floor=cfg.lr_floor, seed=cfg.seed)
    cen = centralized(insts, cfg.model, dataset.n_classes, tcfg, quiet=quiet)
    loc = local_only(insts, cfg.model, dataset.n_classes, tcfg, quiet=quiet)
    col = run_collaborative(insts, dataset.n_classes, cfg, chain=chain, quiet=quiet)
    rows = [{**r, "partition": scheme} for r in cen.rows + loc.rows]
    rows += [{**r, "partition": scheme} for r in score_rows("collaborative", col.model, insts)]
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
    return PartitionRun(scheme, rows, pd.DataFrame(curves).assign(partition=scheme), col, ref,
                        extra={"passes": {"centralized": epochs, "local_only": epochs,
                                          "collaborative": cfg.rounds * cfg.local_epochs}})


def partition_summary(run: PartitionRun, tolerance: float) -> dict:
    """The numbers that decide claim 1 on one partition, and its verdict."""
    table = pd.DataFrame(run.rows)
    pooled = table[table.eval_on == "pooled"]

    def final(method: str, key: str) -> float:
        return float(pooled[pooled.method == method][key].mean())

    cen, col = final("centralized", "acc"), final("collaborative", "acc")
    loc = mean_local_only(run.rows)
    accs = pd.Series({h["round"]: h["acc"] for h in run.collab.history})   # pooled test ACC by round
    reached = accs[accs >= cen - tolerance]
    t = run.collab.timings
    out = {
        "centralized": {"acc": cen, "auc": final("centralized", "auc")},
        "collaborative": {"acc": col, "auc": final("collaborative", "auc")},
        "local_only_mean": {"acc": loc, "auc": final("local_only", "auc")},
        "gap_collaborative_minus_centralized": col - cen,
        "gain_over_local_only": col - loc,
        "rounds": int(len(run.collab.history)),
        "rounds_to_within_tolerance": int(reached.index[0]) if len(reached) else None,
        "holds": bool(abs(col - cen) <= tolerance and col > loc),
        "passes_over_local_data": run.extra.get("passes"),
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


def plot_curves(curves: pd.DataFrame, summary: dict | None = None):
    """Pooled-test ACC vs round (collaborative) / epoch (centralized, local-only), one panel per
    partition; local-only institutions as thin lines. Returns the figure."""
    parts = list(dict.fromkeys(curves.partition))
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 3.8), squeeze=False, sharey=True)
    for ax, part in zip(axes[0], parts):
        c = curves[curves.partition == part]
        for i, (inst, g) in enumerate(c[c.method == "local_only"].groupby("institution")):
            ax.plot(g.step, g.acc, color="tab:gray", lw=0.8, alpha=0.7, label="local-only (each)" if i == 0 else None)
        for method, color in (("centralized", "tab:blue"), ("collaborative", "tab:red")):
            g = c[c.method == method]
            ax.plot(g.step, g.acc, color=color, lw=2, label=method.replace("collaborative", "collaborative (on chain)"))
        ax.set_title(f"partition: {part}")
        ax.set_xlabel("passes over local data (collaborative: round × local epochs)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (pooled)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
