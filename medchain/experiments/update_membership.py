"""Membership inference on what the chain shows each round (claim 2): the per-round,
per-institution updates, read from the ledger and decoded as any member reads them.

* :func:`update_membership` — the loss-difference attack on every kept round and institution
  (:func:`medchain.attacks.membership.update_loss_attack`; no calibration).
* :func:`update_lira` — the same statistic calibrated per image with shadow updates (LiRA online,
  Carlini et al. 2022): for a kept round, the attacker replays the target institution's round of
  the task — the real :class:`~medchain.protocol.Institution` with the task's parameters from the
  chain (model, local epochs, batch size, optimizer, lr of that round, BN recalibration, selection,
  clipping / noise, DP-SGD) — from the round's global model on ``n_shadow`` shadow training sets,
  each a random half of the candidates (every candidate *in* for half the shadows), and scores the
  target's update by the likelihood ratio of its loss drop under the in / out Gaussians.

Shadow training sets hold ``m`` candidates where the target trained on its whole training set
(``m`` ≤ its size; equal when ``n`` allows). Shadows draw their own shuffling, selection and noise
(seed offset), never the target's.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pandas as pd

from medchain.attacks.membership import lira_scores, mia_metrics, per_example_loss, update_loss_attack
from medchain.data.types import ImageSet, InstitutionData
from medchain.params import Layout, load_flat
from medchain.protocol import Institution

__all__ = ["update_membership", "update_lira"]


def _sender(inst) -> str:
    return getattr(inst.ledger.account, "address", inst.ledger.account)


def _revealed(before: np.ndarray, indices, values) -> np.ndarray:
    """The model a member sees for an update: ``before`` with the decoded Δ added on its revealed
    coordinates (all when ``indices`` is None), float32 (P,)."""
    after = before.astype(np.float64)
    if indices is None:
        after += np.asarray(values, np.float64)
    else:
        after[indices] += np.asarray(values, np.float64)
    return after.astype(np.float32)


def update_membership(runs: dict, institutions: list[InstitutionData], *, n: int = 150,
                      seed: int = 0) -> pd.DataFrame:
    """Loss-difference attack on every kept round (the snapshots of
    :func:`medchain.experiments.privacy.defence_runs`) and institution: ``n`` of that institution's
    training images against ``n`` test images of all institutions. Rows: defence, attack, round,
    institution, auc, tpr@1%fpr, tpr@0.1%fpr."""
    rng = np.random.default_rng(seed)
    test = ImageSet.concat([d.test for d in institutions])
    nonmembers = test.subset(np.sort(rng.choice(len(test), min(n, len(test)), replace=False)))
    members = {d.index: d.train.subset(np.sort(rng.choice(len(d.train), min(n, len(d.train)), replace=False)))
               for d in institutions}
    rows = []
    for name, res in runs.items():
        inst0 = res.institutions[0]
        for r, before in sorted(getattr(res, "snapshots", {}).items()):
            for rec, dec in inst0.read_round(r):
                owner = next(i for i in res.institutions if _sender(i) == rec.sender)
                after = _revealed(before, dec.indices, dec.values)
                a = update_loss_attack(res.model, before, after, members[owner.index], nonmembers)
                rows.append({"defence": name, "round": r, "institution": owner.index, **a.as_dict()})
    return pd.DataFrame(rows)


def _loss_drop(model, before, after, data: ImageSet) -> np.ndarray:
    layout = Layout.from_module(model)
    load_flat(model, before, layout)
    lb = per_example_loss(model, data)
    load_flat(model, after, layout)
    return np.nan_to_num(lb - per_example_loss(model, data), nan=0.0, posinf=0.0, neginf=0.0)


def update_lira(runs: dict, institutions: list[InstitutionData], n_classes: int, cfgs: dict, *,
                n_shadow: int = 16, n: int = 150, target: int = 0, seed: int = 0) -> pd.DataFrame:
    """LiRA on the per-round update of institution ``target`` for every kept round and defence.

    runs: defence → CollabResult with ``snapshots`` (round → global model it started from);
    cfgs: defence → the task's CollabConfig (as on chain). Candidates: ``m = min(n, its training
    set, the pooled test sets)`` of the target's training images (members) and ``m`` test images
    (non-members). Costs ``n_shadow`` local rounds per defence and round. Rows: defence, attack
    "update_lira", round, institution, auc, tpr@…, tp@… (members found: for Clopper–Pearson
    intervals pooled over seeds), n_members, n_nonmembers, n_shadow.
    """
    if n_shadow < 2 or n_shadow % 2:
        raise ValueError(f"n_shadow must be an even number >= 2 (half in, half out), got {n_shadow}")
    rng = np.random.default_rng(seed)
    own = next(d for d in institutions if d.index == target)
    test = ImageSet.concat([d.test for d in institutions])
    m = min(n, len(own.train), len(test))
    members = own.train.subset(np.sort(rng.choice(len(own.train), m, replace=False)))
    nonmembers = test.subset(np.sort(rng.choice(len(test), m, replace=False)))
    cand = ImageSet.concat([members, nonmembers])
    is_member = np.r_[np.ones(m, bool), np.zeros(m, bool)]
    keep = np.argsort(rng.random((n_shadow, 2 * m)), axis=0) < n_shadow // 2
    rows = []
    for name, res in runs.items():
        cfg = cfgs[name]
        probe = copy.deepcopy(res.model)
        tgt = next(i for i in res.institutions if i.index == target)
        for r, before in sorted(getattr(res, "snapshots", {}).items()):
            mine = [(rec, dec) for rec, dec in res.institutions[0].read_round(r) if rec.sender == _sender(tgt)]
            if len(mine) != 1:
                raise RuntimeError(f"{name}: expected one update of institution {target} in round {r}")
            stat = _loss_drop(probe, before, _revealed(before, mine[0][1].indices, mine[0][1].values), cand)
            shadow = np.zeros((n_shadow, 2 * m))
            for s in range(n_shadow):
                part = cand.subset(np.flatnonzero(keep[s]))
                scfg = replace(cfg, seed=cfg.seed + 7919 * (s + 1))     # its own shuffling, selection, noise
                inst = Institution(InstitutionData(target, part, part, part), n_classes, scfg, None,
                                   init_model=copy.deepcopy(probe))
                inst.global_vec = before.copy()
                inst.local_vec = before.copy()
                delta = inst.train_round(r)
                idx, vals = inst.selection(delta, r)          # what it would post
                shadow[s] = _loss_drop(probe, before, _revealed(before, idx, vals), cand)
            scores = lira_scores(stat, shadow, keep)
            auc, tpr = mia_metrics(scores, is_member)
            rows.append({"defence": name, "attack": "update_lira", "round": r, "institution": target, "auc": auc,
                         **{f"tpr@{100 * f:g}%fpr": v for f, v in tpr.items()},
                         **{f"tp@{100 * f:g}%fpr": int(round(v * m)) for f, v in tpr.items()},   # members found
                         "n_members": m, "n_nonmembers": m, "n_shadow": n_shadow})
    return pd.DataFrame(rows)
