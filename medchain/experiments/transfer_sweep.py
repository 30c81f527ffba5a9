"""Claim 3's sweep (notebooks/03_cross_chain_transfer.ipynb): the arms and :func:`run_sweep`; its
numbers, verdicts and figures are in :mod:`medchain.experiments.transfer_summary`.

An *arm* is what the target task does with a source: ``"none"`` (no transfer) or
``"<method>@<relation>"`` — a method of :data:`~medchain.experiments.transfer.METHODS` or
:data:`~medchain.experiments.transfer.CONTROLS` applied to the source of that relation
(:data:`~medchain.experiments.transfer_pairs.RELATIONS`), e.g. ``"warm_start@similar"``,
``"l2sp@unrelated"``, ``"pooled@similar"``. With one source, a bare method name (``"warm_start"``)
names it.

Per seed, :func:`run_sweep` opens chain B, relays every source's global model through the bridge
(one accepted message per source, each digest-checked on receipt), then runs every fraction × arm.
:func:`~medchain.experiments.transfer_summary.summarize` decides, at ``verdict_fraction``, for each chain method from a non-unrelated
source: it beats no transfer *and* the same method from the unrelated source, each by a paired
95 % interval above 0 over seeds (:func:`medchain.stats.superiority`, both must hold). The
speed-up (rounds no transfer needs to first reach its own final ACC ÷ rounds the arm needs) is
reported per seed with its interval, beside how often the arm is there at round 1.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pandas as pd

from medchain.baselines import pooled_test
from medchain.data import Dataset, ImageSet
from medchain.experiments.transfer import (CONTROLS, METHOD_LABELS, METHODS, SourceTask,
                                           bridge_transfer, genesis_hash, local_epochs_for, open_target_chain,
                                           receive_source_model, run_target, source_on_target, split_institutions)
from medchain.protocol import CollabConfig

__all__ = ["parse_arm", "arm_label", "arms_for", "TransferSweep", "run_sweep"]

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
