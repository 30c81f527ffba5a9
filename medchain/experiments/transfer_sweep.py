"""Claim 3's sweep, numbers, verdicts and figures (notebooks/03_cross_chain_transfer.ipynb).

An *arm* is what the target task does with a source: ``"none"`` (no transfer) or
``"<method>@<relation>"`` — a method of :data:`~medchain.experiments.transfer.METHODS` or
:data:`~medchain.experiments.transfer.CONTROLS` applied to the source of that relation
(:data:`~medchain.experiments.transfer_pairs.RELATIONS`), e.g. ``"warm_start@similar"``,
``"l2sp@unrelated"``, ``"pooled@similar"``. With one source, a bare method name (``"warm_start"``)
names it.

Per seed, :func:`run_sweep` opens chain B, relays every source's global model through the bridge
(one accepted message per source, each digest-checked on receipt), then runs every fraction × arm.
:func:`summarize` decides, at ``verdict_fraction``, for each chain method from a non-unrelated
source: it beats no transfer *and* the same method from the unrelated source, each by a paired
95 % interval above 0 over seeds (:func:`medchain.stats.superiority`, both must hold). The
speed-up (rounds no transfer needs to first reach its own final ACC ÷ rounds the arm needs) is
reported per seed with its interval, beside how often the arm is there at round 1.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medchain import stats
from medchain.baselines import pooled_test
from medchain.data import Dataset, ImageSet
from medchain.experiments.transfer import (_COLORS, _LINES, CONTROLS, METHOD_LABELS, METHODS, SourceTask,
                                           bridge_transfer, genesis_hash, local_epochs_for, open_target_chain,
                                           receive_source_model, run_target, source_on_target, split_institutions)
from medchain.protocol import CollabConfig

__all__ = ["parse_arm", "arm_label", "arms_for", "TransferSweep", "run_sweep", "rounds_to", "per_seed_table",
           "summarize", "score_table", "plot_curves", "plot_vs_fraction"]

_METRICS = ("acc", "balanced_acc", "auc", "loss")


def parse_arm(arm: str, relations: Sequence[str] = ()) -> tuple[str, str | None]:
    """``"warm_start@similar"`` → ("warm_start", "similar"); ``"none"`` → ("none", None); a bare
    method names the only source when there is one. ValueError for anything else."""
    method, _, rel = arm.partition("@")
    if method not in METHODS + CONTROLS:
        raise ValueError(f"unknown method {method!r} in arm {arm!r}; choose one of {METHODS + CONTROLS}")
    if method == "none":
        if rel:
            raise ValueError(f"arm {arm!r}: no transfer uses no source; write 'none'")
        return method, None
    if not rel:
        if len(relations) != 1:
            raise ValueError(f"arm {arm!r} must name its source: '{method}@<relation>' with one of {list(relations)}")
        rel = relations[0]
    if relations and rel not in relations:
        raise ValueError(f"arm {arm!r} names the source {rel!r}; the sweep has {list(relations)}")
    return method, rel


def arm_label(arm: str) -> str:
    """"warm start (similar)" for "warm_start@similar"."""
    method, _, rel = arm.partition("@")
    label = METHOD_LABELS.get(method, method)
    return f"{label} ({rel.replace('_', ' ')})" if rel else label


def arms_for(methods: Sequence[str], relations: Sequence[str], same_classes: dict[str, bool]) -> list[str]:
    """["none"] and every method × relation that makes sense: the source as is only where its
    classes are the target's, pooled training not with the unrelated source (no bound to learn)."""
    arms = ["none"]
    for rel in relations:
        for m in methods:
            if m == "none" or (m == "as_is" and not same_classes[rel]) or (m == "pooled" and rel == "unrelated"):
                continue
            arms.append(f"{m}@{rel}")
    return arms


# ============================================================================ the sweep
@dataclass
class TransferSweep:
    """Everything measured: learning curves (one row per fraction, arm, seed, round; the controls
    one row at the last round), the source tasks, and per seed chain B's bridge and messages."""

    curves: pd.DataFrame
    sources: dict[str, SourceTask]
    chains: dict = field(default_factory=dict)     # seed -> {"bridge", "messages": {relation: ...}, ...}
    runs: list = field(default_factory=list)       # one dict per target run (ledger address, digest, ...)
    rounds: int = 0
    wall_s: float = 0.0
    targets: dict = field(default_factory=dict, repr=False)   # seed -> TargetChain (live chain B)

    @property
    def source(self) -> SourceTask:
        """The first source task (the only one in a single-source sweep)."""
        return next(iter(self.sources.values()))


def _pooled_train(insts) -> ImageSet:
    return ImageSet.concat([i.train for i in insts])


def run_sweep(sources, target_ds: Dataset, cfg: CollabConfig, *,
              fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 1.0), methods: Sequence[str] = METHODS,
              seeds: Sequence[int] = (0, 1, 2), target_institutions: int | None = None,
              min_local_steps: int = 8, anchor_strength: float = 0.01, quorum: int = 2, pooled_epochs: int = 10,
              chain: str = "embedded", quiet: bool = True, progress=None) -> TransferSweep:
    """For each seed: open chain B (bridge deployed), relay every source's global model, then run the
    target task for every fraction × arm (``methods``: arms, see :func:`parse_arm`).

    sources: one :class:`SourceTask` or ``{relation: SourceTask}``; sources on in-process chains must
      share one chain A (distinct task ledgers), since those chains share one chain id.
    cfg: the target task's configuration (its seed replaced by each seed; its local epochs raised
      per fraction by :func:`local_epochs_for`). The seed draws the target institutions' training
      subset, the model initialisation and the shuffling; every arm is scored on the same pooled
      test split. pooled_epochs: passes over the source data of the pooled control."""
    t0 = time.perf_counter()
    sources = dict(sources) if isinstance(sources, dict) else {"source": sources}
    rels = list(sources)
    parsed = {arm: parse_arm(arm, rels) for arm in methods}
    keys = {(s.chain_id, s.ledger.address) for s in sources.values()}
    if len(keys) != len(sources):
        raise ValueError("two source tasks have the same chain id and ledger address (separate in-process chains); "
                         "train them on one chain A (train_source(..., chain=w3)) so each has its own ledger")
    for arm, (m, rel) in parsed.items():
        if m == "as_is" and sources[rel].n_classes != target_ds.n_classes:
            raise ValueError(f"arm {arm!r}: the source has {sources[rel].n_classes} classes, the target "
                             f"{target_ds.n_classes}; the source model as it is applies only to the same classes")
        if m == "pooled" and sources[rel].data is None:
            raise ValueError(f"arm {arm!r} needs the source's images (SourceTask.data, set by train_source)")
    used = [r for r in rels if any(rel == r for _, rel in parsed.values())]
    rows, chains, runs, targets = [], {}, [], {}
    for seed in map(int, seeds):
        chain_b = targets[seed] = open_target_chain(chain)
        relays = {r: bridge_transfer(sources[r], chain_b, quorum=quorum) for r in used}
        messages = {r: {"message_id": "0x" + v.id.hex(), "signers": v.signers, "relay_gas": v.gas_used,
                        "refusals": v.refusals, "source_ledger": sources[r].ledger.address} for r, v in relays.items()}
        chains[seed] = {"bridge": chain_b.bridge.address, "bridge_identity": chain_b.identity,
                        "genesis_hash": genesis_hash(chain_b.w3), "messages": messages,
                        **(messages[used[0]] if used else {})}
        for frac in fractions:
            insts = split_institutions(target_ds, target_institutions, fraction=frac, seed=seed)
            epochs = local_epochs_for(insts, cfg.batch_size, min_local_steps, cfg.local_epochs)
            run_cfg = replace(cfg, seed=seed, local_epochs=epochs)
            n_train = sum(len(i.train) for i in insts)
            test = pooled_test(insts)
            for arm, (method, rel) in parsed.items():
                t_run = time.perf_counter()
                run = {"fraction": float(frac), "method": arm, "seed": seed, "n_train": n_train, "local_epochs": epochs}
                if method in METHODS:
                    src = sources.get(rel)
                    res = run_target(insts, target_ds.n_classes, run_cfg, method, chain_b,
                                     message_id=relays[rel].id if rel else None,
                                     source=src,
                                     anchor_strength=anchor_strength, quiet=quiet)
                    history = res.history
                    run.update(ledger_address=res.ledger_address, chain_identity=res.chain_identity,
                               final_digest=res.final_digest.hex())
                else:
                    history = [{"round": cfg.rounds,
                                **_control(method, sources[rel], relays.get(rel), chain_b, insts, test, target_ds,
                                           run_cfg, pooled_epochs)}]
                for h in history:
                    rows.append({**{k: run[k] for k in ("fraction", "method", "seed", "n_train", "local_epochs")},
                                 "round": h["round"], **{k: h[k] for k in _METRICS if k in h}})
                run.update(final_acc=float(history[-1]["acc"]), wall_s=time.perf_counter() - t_run)
                runs.append(run)
                if progress is not None:
                    progress(run)
        chains[seed]["final_block_hash"] = _block_hash(chain_b.w3)
        chains[seed]["block_number"] = int(chain_b.w3.eth.block_number)
    return TransferSweep(pd.DataFrame(rows), sources, chains, runs, cfg.rounds, time.perf_counter() - t0, targets)


def _control(method, source: SourceTask, relay, chain_b, insts, test, target_ds, cfg, pooled_epochs) -> dict:
    from medchain.experiments.transfer_controls import linear_probe, pooled_multitask
    if method == "as_is":
        return source_on_target(source, replace(target_ds, test=test))
    if method == "probe":   # the relayed model, received and digest-checked like every chain-B member does
        net, _ = receive_source_model(chain_b, relay.id, source, cfg.model, insts[0].train.n_channels,
                                      target_ds.n_classes, cfg.seed)
        return linear_probe(net, _pooled_train(insts), test, target_ds.n_classes, seed=cfg.seed)
    return pooled_multitask(source.data.train, source.n_classes, _pooled_train(insts), target_ds.n_classes, test,
                            model=cfg.model, epochs=pooled_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            lr_floor=cfg.lr_floor, seed=cfg.seed)


def _block_hash(w3) -> str:
    from medchain.chain import final_block_hash
    return final_block_hash(w3)


# ============================================================================ numbers and verdict
def rounds_to(accs: Sequence[float], target: float) -> int | None:
    """The first round (1-based) whose ACC reaches ``target`` (within 1e-9), or None."""
    for r, a in enumerate(accs, start=1):
        if a >= target - 1e-9:
            return r
    return None


def _order(arm: str) -> tuple:
    method, _, rel = arm.partition("@")
    rels = ["", "source", "similar", "same_task", "unrelated"]
    return (rels.index(rel) if rel in rels else len(rels), (METHODS + CONTROLS).index(method), rel)


def per_seed_table(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per (fraction, arm, seed): final ACC / balanced ACC / AUC, best ACC, the no-transfer
    run's final ACC at the same fraction and seed (the target), rounds to reach it (None: never;
    controls have no rounds), gain and speed-up over no transfer."""
    rows = []
    for (frac, seed), g in curves.groupby(["fraction", "seed"]):
        ref = g[g.method == "none"].sort_values("round")
        if ref.empty:
            raise ValueError("the sweep needs the 'none' method (no transfer) as the reference")
        target = float(ref.acc.iloc[-1])
        ref_rounds = rounds_to(ref.acc.tolist(), target)
        for arm, m in g.groupby("method", sort=False):
            m = m.sort_values("round")
            chain_run = arm.partition("@")[0] in METHODS
            r = rounds_to(m.acc.tolist(), target) if chain_run else None
            last = m.iloc[-1]
            auc = float(last["auc"]) if "auc" in m else float("nan")
            rows.append({"fraction": frac, "method": arm, "seed": seed, "n_train": int(m.n_train.iloc[0]),
                         "final_acc": float(last.acc), "best_acc": float(m.acc.max()),
                         "final_balanced_acc": float(last["balanced_acc"]) if "balanced_acc" in m else float("nan"),
                         "final_auc": auc, "target_acc": target, "rounds_to_target": r,
                         "reference_rounds": ref_rounds, "gain": float(last.acc) - target,
                         "auc_gain": (auc - float(ref.auc.iloc[-1])) if "auc" in m else float("nan"),
                         "speedup": (ref_rounds / r) if r else float("nan")})
    return (pd.DataFrame(rows).assign(_o=lambda d: d.method.map(_order))
            .sort_values(["fraction", "_o", "seed"]).drop(columns="_o").reset_index(drop=True))


def _describe(values) -> dict | None:
    a = np.asarray(values, dtype=float)
    return stats.describe(a) if a.size and np.isfinite(a).all() else None


def summarize(sweep: TransferSweep, *, verdict_fraction: float = 0.05, min_gain: float = 0.0,
              plentiful: float = 0.5, **_ignored) -> dict:
    """The numbers that decide claim 3 per fraction and arm (mean, SD, 95 % t interval over seeds of
    final ACC, balanced ACC and AUC; rounds to the no-transfer final ACC, censored at ``rounds + 1``
    when never reached; per-seed speed-up with its interval) and the verdicts (see the module
    docstring). With a scarce (≤ ``verdict_fraction``) and a plentiful (≥ ``plentiful``) fraction, a
    second verdict asks whether the best similar-source method's gain is larger when data are scarce."""
    table = per_seed_table(sweep.curves)
    R = sweep.rounds
    per_fraction: dict = {}
    for frac, g in table.groupby("fraction"):
        entry = {"n_train": int(g.n_train.iloc[0]), "target_acc_mean": float(g[g.method == "none"].final_acc.mean())}
        for arm, m in g.groupby("method", sort=False):
            chain_run = arm.partition("@")[0] in METHODS
            rounds = m.rounds_to_target.fillna(R + 1).astype(float)
            ref = m.reference_rounds.astype(float)
            e = {"label": arm_label(arm),
                 "final_acc_mean": float(m.final_acc.mean()), "final_acc_std": _std(m.final_acc),
                 "final_acc_min": float(m.final_acc.min()), "final_acc_max": float(m.final_acc.max()),
                 "best_acc_mean": float(m.best_acc.mean()), "final_auc_mean": float(m.final_auc.mean()),
                 "gain_mean": float(m.gain.mean()), "gain_std": _std(m.gain),
                 "acc": _describe(m.final_acc), "balanced_acc": _describe(m.final_balanced_acc),
                 "auc": _describe(m.final_auc), "per_seed_final_acc": [float(v) for v in m.final_acc]}
            if chain_run:
                e.update({"rounds_to_target_mean": float(rounds.mean()),
                          "rounds_to_target": [None if pd.isna(v) else int(v) for v in m.rounds_to_target],
                          "reference_rounds_mean": float(ref.mean()),
                          "never_reached": int(m.rounds_to_target.isna().sum()),
                          "at_round_1": int((m.rounds_to_target == 1).sum()),
                          "speedup": float(ref.mean() / rounds.mean()),
                          "speedup_per_seed": _describe(ref.to_numpy() / rounds.to_numpy())})
            entry[arm] = e
        per_fraction[f"{frac:g}"] = entry
    key = _closest(per_fraction, verdict_fraction)
    arms = list(dict.fromkeys(table.method))
    n_rel = {a.partition("@")[2] for a in arms if "@" in a}
    verdicts = []
    deciding = [a for a in arms if a.partition("@")[0] in METHODS[1:] and a.partition("@")[2] != "unrelated"]
    if key is not None:
        at = table[np.isclose(table.fraction, float(key))]
        for arm in deciding:
            verdicts.append(_verdict(arm, at, per_fraction[key][arm], key, min_gain, R, single=len(n_rel) <= 1))
    fr = sorted(per_fraction, key=float)
    if len(fr) >= 2 and deciding and float(fr[0]) <= verdict_fraction and float(fr[-1]) >= plentiful:
        lo, hi = float(fr[0]), float(fr[-1])
        best = max(deciding, key=lambda a: per_fraction[fr[0]][a]["gain_mean"])
        g = table[table.method == best]
        by_seed = (g[np.isclose(g.fraction, lo)].set_index("seed").gain
                   - g[np.isclose(g.fraction, hi)].set_index("seed").gain).dropna()
        verdicts.append(stats.claim_verdict(
            "claim 3 (scarcity): the accuracy gain of transfer is larger when target data are scarce",
            [stats.superiority(by_seed.to_numpy(), 0.0, metric="acc", a=f"gain at {lo:.0%}", b=f"gain at {hi:.0%}")],
            deciding_metric="acc", why_metric=f"{arm_label(best)}'s final-ACC gain, paired by seed"))
    return {"per_fraction": per_fraction, "verdicts": verdicts, "verdict_fraction": float(key) if key else None,
            "arms": arms, "per_seed": table.to_dict(orient="records")}


def _verdict(arm: str, at: pd.DataFrame, e: dict, key: str, min_gain: float, R: int, single: bool) -> dict:
    method, _, rel = arm.partition("@")
    mine = at[at.method == arm].set_index("seed").sort_index()
    decisions = []
    for col, metric in (("final_acc", "acc"), ("final_auc", "auc")):
        ref = at[at.method == "none"].set_index("seed")[col]
        diff = (mine[col] - ref).dropna()
        if len(diff) == len(mine) and np.isfinite(diff).all():
            decisions.append(stats.superiority(diff.to_numpy(), min_gain if metric == "acc" else 0.0, metric=metric,
                                               a=arm_label(arm), b="no transfer"))
    control = f"{method}@unrelated"
    has_control = control in set(at.method)
    if has_control:
        other = at[at.method == control].set_index("seed")
        for col, metric in (("final_acc", "acc"), ("final_auc", "auc")):
            diff = (mine[col] - other[col]).dropna()
            if len(diff) == len(mine) and np.isfinite(diff).all():
                decisions.append(stats.superiority(diff.to_numpy(), 0.0, metric=metric, a=arm_label(arm),
                                                   b=arm_label(control)))
    frac = f"{float(key):.0%} target data"
    if single:
        claim = (f"claim 3 ({METHOD_LABELS[method]}, {frac}): transfer beats no transfer by more than "
                 f"{100 * min_gain:g} points of final ACC")
    else:
        claim = (f"claim 3 ({METHOD_LABELS[method]} from the {rel.replace('_', ' ')} source, {frac}): beats no transfer"
                 + (" and the same transfer from the unrelated source" if has_control
                    else " (no unrelated-source control in this run)"))
    v = stats.claim_verdict(claim, decisions, deciding_metric="acc",
                            why_metric="final test ACC of the target task, paired by seed (same subset and "
                                       "initialization)")
    sp = e.get("speedup_per_seed")
    ci = "" if not sp or not math.isfinite(sp["ci_low"]) else f" [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]"
    v["detail"] += (f"; speed-up to the no-transfer final ACC {sp['mean'] if sp else float('nan'):.2f}×{ci} "
                    f"(mean over seeds; no transfer first reaches its final ACC at round "
                    f"{e['reference_rounds_mean']:.1f} of {R} on average, this arm at round "
                    f"{e['rounds_to_target_mean']:.1f}, {e['at_round_1']} seed(s) at round 1, {e['never_reached']} "
                    "never; reported, not decided)")
    v["speedup"] = sp
    return v


def score_table(summary: dict) -> pd.DataFrame:
    """One row per fraction × arm: ACC, balanced ACC and AUC as "mean [95 % CI]" over seeds."""
    rows = []
    for frac, e in summary["per_fraction"].items():
        for arm, m in e.items():
            if isinstance(m, dict) and "acc" in m:
                rows.append({"fraction": f"{float(frac):.0%}", "n_train": e["n_train"], "arm": m["label"],
                             **{k: _fmt(m[k]) for k in ("acc", "balanced_acc", "auc")}})
    return pd.DataFrame(rows)


def _fmt(d: dict | None) -> str:
    if d is None:
        return "–"
    if not math.isfinite(d["ci_low"]):
        return f"{d['mean']:.3f}"
    return f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def _std(s: pd.Series) -> float:
    return float(s.std(ddof=1)) if len(s) > 1 else 0.0


def _closest(per_fraction: dict, value: float) -> str | None:
    keys = [k for k in per_fraction if math.isclose(float(k), value, rel_tol=1e-6)]
    return keys[0] if keys else None


# ============================================================================ figures
def _style(arm: str) -> dict:
    method, _, rel = arm.partition("@")
    return {"color": _COLORS[method], "ls": _LINES.get(rel or None, "-"), "label": arm_label(arm)}


def plot_curves(curves: pd.DataFrame, as_is: float | None = None):
    """Target test ACC vs round of the chain-B arms, one panel per fraction, mean over seeds with a
    min–max band. as_is: the source model's ACC on the target as it is, drawn dashed."""
    fracs = sorted(curves.fraction.unique())
    fig, axes = plt.subplots(1, len(fracs), figsize=(4.2 * len(fracs), 3.6), squeeze=False, sharey=True)
    arms = sorted({a for a in curves.method if a.partition("@")[0] in METHODS}, key=_order)
    for ax, frac in zip(axes[0], fracs):
        c = curves[curves.fraction == frac]
        for arm in arms:
            g = c[c.method == arm].groupby("round").acc
            mean, lo, hi = g.mean(), g.min(), g.max()
            st = _style(arm)
            ax.plot(mean.index, mean.values, lw=2, **st)
            ax.fill_between(mean.index, lo.values, hi.values, color=st["color"], alpha=0.1)
        if as_is is not None:
            ax.axhline(as_is, color="k", lw=1, ls="--", label="source model as it is")
        ax.set_title(f"{frac:.0%} of target training data ({int(c.n_train.iloc[0])} images)", fontsize=10)
        ax.set_xlabel("round on chain B")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("target test accuracy")
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_vs_fraction(summary: dict, rounds: int):
    """Final ACC (mean with 95 % interval over seeds) of every arm, and rounds to the no-transfer
    final ACC of the chain arms, vs target data fraction (log-scaled axis)."""
    pf = summary["per_fraction"]
    fr = sorted(pf, key=float)
    x = np.array([float(f) for f in fr])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    arms = [a for a in sorted(summary["arms"], key=_order) if all(a in pf[f] for f in fr)]
    for i, arm in enumerate(arms):
        xs = x * (1 + 0.03 * (i - len(arms) / 2))   # small offsets so error bars do not overlap
        acc = np.array([pf[f][arm]["final_acc_mean"] for f in fr])
        ci = [pf[f][arm]["acc"] for f in fr]
        err = np.array([[m - (d["ci_low"] if d and math.isfinite(d["ci_low"]) else m),
                         (d["ci_high"] if d and math.isfinite(d["ci_high"]) else m) - m] for d, m in zip(ci, acc)]).T
        st = _style(arm)
        a1.errorbar(xs, acc, yerr=err, marker="o", capsize=3, **st)
        if arm.partition("@")[0] in METHODS:
            a2.plot(xs, [pf[f][arm]["rounds_to_target_mean"] for f in fr], marker="o", **st)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:.0%}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel("fraction of target training data")
        ax.grid(alpha=0.3)
    a1.set_ylabel("final target test accuracy (95 % CI)")
    a2.set_ylabel("rounds to no-transfer final ACC")
    a2.axhline(rounds + 1, color="k", lw=0.8, ls=":")
    a2.text(x[0], rounds + 1, " never", va="bottom", fontsize=8)
    a1.legend(fontsize=7)
    fig.tight_layout()
    return fig
