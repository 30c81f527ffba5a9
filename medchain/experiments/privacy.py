"""Claim 2: partial parameter update (sharing a fraction θu of each update) prevents indirect
leakage of patient images through what the chain reveals, at little cost in accuracy.
Used by notebooks/02_partial_update_privacy.ipynb.

Four measurements, all on what a chain member can read:

* :func:`utility_sweep` — collaborative training on chain (:func:`medchain.protocol.run_collaborative`)
  for each θu × selection rule (θu = 1 once: everything is shared, the rule is moot); final
  pooled-test ACC / AUC per run.
* :func:`worst_case_leakage` — gradient inversion (:func:`medchain.attacks.invert`) in the
  literature's worst case (one image, one gradient step, an untrained sigmoid LeNet), per θu × rule ×
  attacker model (naive / mask-aware) × method; the payload attacked is the codec-encoded update,
  byte for byte what an institution submits (:class:`medchain.attacks.InversionCase`).
* :func:`protocol_leakage` — the protocol setting: a real one-round chain run in which every
  institution holds a batch of B images and trains E local epochs from the *trained* global model
  (the utility sweep's model at that θu); the target institution's update is read back from the
  chain (``LedgerClient.updates(0)`` → :func:`medchain.blobstore.fetch_payload`) and inverted.
* :func:`membership_sweep` — membership inference on the shared global model of every utility run:
  Yeom's loss attack, and a small LiRA (shadow models shared across θu) when asked for.

:func:`summarize` turns the tables into the claim's numbers and verdicts; ``plot_*`` draw the figures.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from medchain import codec, stats
from medchain.attacks import (InversionCase, NothingToInvert, PublicInfo, invert, logit_confidence,
                              loss_attack, mia_metrics)
from medchain.attacks.membership import lira_scores
from medchain.blobstore import fetch_payload
from medchain.data.types import ImageSet, InstitutionData
from medchain.metrics import psnr as psnr_fn
from medchain.metrics import ssim as ssim_fn
from medchain.models import build_model
from medchain.params import Layout, model_vector
from medchain.protocol import CollabConfig, CollabResult, run_collaborative
from medchain.training import TrainConfig, train_epochs

__all__ = ["UtilitySweep", "LeakageRun", "utility_sweep", "pick_images", "worst_case_leakage",
           "protocol_update", "protocol_leakage", "membership_sweep", "mean_image_baseline",
           "summarize", "plot_accuracy", "plot_leakage", "plot_frontier", "plot_reconstructions",
           "plot_membership", "PSNR_BAR"]

PSNR_BAR = 12.0   # dB: below this a reconstruction is counted as "no recognisable image"


def _runs(thetas: Sequence[float], rules: Sequence[str]) -> list[tuple[float, str]]:
    """(θu, rule) pairs in sweep order, θu = 1 once (labelled with the first rule)."""
    out = []
    for t in sorted({float(t) for t in thetas}, reverse=True):
        for rule in (rules[:1] if t == 1.0 else rules):
            out.append((t, rule))
    return out


# --------------------------------------------------------------------------------------------
# (1) utility

@dataclass
class UtilitySweep:
    """rows: one per (θu, rule) run with the final pooled-test metrics; curves: ACC per round;
    runs: the chain runs themselves, keyed by (θu, rule)."""

    rows: list[dict]
    curves: pd.DataFrame
    runs: dict = field(repr=False)

    def model(self, theta_u: float, rule: str):
        """The final global model of the run at (θu, rule) (θu = 1: whatever the rule)."""
        key = (float(theta_u), rule)
        if key not in self.runs and float(theta_u) == 1.0:
            key = next(k for k in self.runs if k[0] == 1.0)
        return self.runs[key].model


def utility_sweep(institutions: list[InstitutionData], n_classes: int, cfg: CollabConfig,
                  thetas: Sequence[float], rules: Sequence[str] = ("largest",), *,
                  chain: str | None = "embedded", quiet: bool = True) -> UtilitySweep:
    """Collaborative training on chain for each θu × rule (θu = 1 once), everything else as ``cfg``.
    Returns a :class:`UtilitySweep`; rows carry theta_u, rule, acc, balanced_acc, auc, loss, the
    payload size per update (bytes) and the chain's ledger address and final block hash."""
    rows, curves, runs = [], [], {}
    for t, rule in _runs(thetas, rules):
        c = CollabConfig(**{**cfg.to_dict(), "theta_u": t, "select_rule": rule})
        res = run_collaborative(institutions, n_classes, c, chain=chain, quiet=quiet)
        runs[(t, rule)] = res
        last = res.history[-1]
        n_shared = [len(i.last_upload[1]) for i in res.institutions]
        rows.append({"theta_u": t, "rule": rule, "acc": last["acc"],
                     "balanced_acc": last.get("balanced_acc"), "auc": last["auc"],
                     "loss": last.get("loss"), "rounds": len(res.history),
                     "values_per_update": float(np.mean(n_shared)),
                     "final_digest": res.final_digest.hex(), "ledger_address": res.ledger_address,
                     "final_block_hash": res.final_block_hash, "wall_s": res.wall_s})
        curves += [{"theta_u": t, "rule": rule, "round": h["round"], "acc": h["acc"]}
                   for h in res.history]
    return UtilitySweep(rows, pd.DataFrame(curves), runs)


# --------------------------------------------------------------------------------------------
# (2) leakage

@dataclass
class LeakageRun:
    """rows: one per attack (setting, θu, rule, attacker, method, image / batch) with psnr, ssim,
    mse, label_acc, revealed_fraction, seconds; recon: (setting, θu, rule, attacker, method) →
    (originals uint8 (B,H,W), reconstructions uint8 (B,H,W)); payloads: what was attacked, keyed
    like recon without attacker/method (bytes); chain: per θu/rule the chain run's identity."""

    rows: list[dict]
    recon: dict = field(repr=False, default_factory=dict)
    payloads: dict = field(repr=False, default_factory=dict)
    chain: dict = field(default_factory=dict)


def pick_images(data: ImageSet, n: int, seed: int = 0) -> np.ndarray:
    """n indices of ``data``, classes taken in turn (deterministic by seed)."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(data.labels == c)) for c in np.unique(data.labels)]
    out, k = [], 0
    while len(out) < n:
        pool = by_class[k % len(by_class)]
        j = k // len(by_class)
        if j < pool.size:
            out.append(int(pool[j]))
        k += 1
        if k > n * len(by_class) + len(data):
            break
    return np.array(out, dtype=np.int64)


def _attack_rows(case_payload: bytes, case, *, setting: str, theta_u: float, rule: str,
                 attackers, methods, steps: dict, seed: int, image_id, store: dict, extra=None):
    rows = []
    for method in methods:
        for attacker in attackers:
            base = {"setting": setting, "theta_u": theta_u, "rule": rule, "attacker": attacker,
                    "method": method, "image": image_id}
            try:
                rec = invert(case_payload, case, method, attacker, steps=steps.get(method), seed=seed)
            except NothingToInvert:   # no image comes out: scored NaN, counted as protected
                rows.append({**base, "n_images": int(len(case.labels)), "psnr": np.nan, "ssim": np.nan,
                             "mse": np.nan, "label_acc": None, "revealed_fraction": 0.0,
                             "label_source": "none", "seconds": 0.0, **(extra or {})})
                continue
            m = rec.metrics
            rows.append({**base, "n_images": int(len(rec.labels)), "psnr": m["psnr"], "ssim": m["ssim"],
                         "mse": m["mse"], "label_acc": m.get("label_acc"),
                         "revealed_fraction": rec.revealed_fraction,
                         "label_source": rec.label_source, "seconds": m["cpu_seconds"],
                         **(extra or {})})
            key = (setting, theta_u, rule, attacker, method)
            o, r = store.get(key, (None, None))
            orig = np.asarray(case.images)
            store[key] = (orig if o is None else np.concatenate([o, orig]),
                          rec.images if r is None else np.concatenate([r, rec.images]))
    return rows


def worst_case_leakage(images: np.ndarray, labels: np.ndarray, n_classes: int,
                       thetas: Sequence[float], rules: Sequence[str] = ("largest",), *,
                       attackers: Sequence[str] = ("naive", "mask_aware"),
                       methods: Sequence[str] = ("idlg",), steps: dict | None = None,
                       lr: float = 0.1, seed: int = 0) -> LeakageRun:
    """Worst case, one image at a time: one gradient step of an untrained sigmoid LeNet
    (:meth:`InversionCase.worst_case`), partial-update selection at θu, the payload encoded with
    :mod:`medchain.codec` exactly as it would go on chain, then every attacker × method.
    images: uint8 (N, H, W); labels: int (N,). steps: per method (None: the attack's defaults)."""
    steps = dict(steps or {})
    run = LeakageRun([])
    for t, rule in _runs(thetas, rules):
        for j, (img, lab) in enumerate(zip(images, labels)):
            case = InversionCase.worst_case(img, int(lab), num_classes=n_classes, theta_u=t,
                                            rule=rule, lr=lr, seed=seed)
            run.payloads[("worst_case", t, rule, j)] = case.payload
            run.rows += _attack_rows(case.payload, case, setting="worst_case", theta_u=t,
                                     rule=rule, attackers=attackers, methods=methods, steps=steps,
                                     seed=seed, image_id=j, store=run.recon)
    return run


@dataclass
class ProtocolUpdate:
    """One institution's update as read back from the chain, and what the attacker knows."""

    payload: bytes = field(repr=False)
    public: PublicInfo
    images: np.ndarray = field(repr=False)
    labels: np.ndarray
    record: object = field(repr=False)          # the medchain.chain.ledger.Update record
    last_upload: tuple = field(repr=False)      # (indices, values) the institution selected
    collab: CollabResult = field(repr=False)


def protocol_update(batches: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int,
                    init_model: torch.nn.Module, cfg: CollabConfig, *, target: int = 0,
                    chain: str | None = "embedded", eval_set: ImageSet | None = None
                    ) -> ProtocolUpdate:
    """Run one collaborative round on chain in which institution ``i`` holds ``batches[i]`` (uint8
    images (B, H, W), labels (B,)) and starts from ``init_model`` (the trained global model); read
    the ``target`` institution's update back from the chain log (and blob store) exactly as every
    other member can, and return it with the public information of the task.
    ``cfg``: rounds is forced to 1 and lr_floor to 1 (a constant local learning rate ``cfg.lr``,
    as the task parameters on chain say)."""
    c = CollabConfig(**{**cfg.to_dict(), "rounds": 1, "lr_floor": 1.0})
    insts = []
    for i, (x, y) in enumerate(batches):
        s = ImageSet(np.asarray(x), np.asarray(y, dtype=np.int64))
        insts.append(InstitutionData(i, s, s, s))
    ev = eval_set if eval_set is not None else ImageSet.concat([d.test for d in insts])
    res = run_collaborative(insts, n_classes, c, chain=chain, eval_set=ev, initial_model=init_model,
                            institution_kwargs=lambda i: {"init_model": copy.deepcopy(init_model)})
    inst = res.institutions[target]
    sender = inst.ledger.account.address if chain is not None else None
    records = inst.ledger.updates(0)
    mine = [r for r in records if sender is None or r.sender == sender]
    if chain is None:
        mine = [records[target]]
    if len(mine) != 1:
        raise RuntimeError(f"expected one update of institution {target} on the ledger, found {len(mine)}")
    rec = mine[0]
    payload = fetch_payload(rec.digest, bytes(rec.payload), inst.store)
    x, y = batches[target]
    layout = Layout.from_module(init_model)
    steps = c.local_epochs * max(1, math.ceil(len(y) / c.batch_size))
    public = PublicInfo(c.model, 1 if np.asarray(x).ndim == 3 else np.asarray(x).shape[-1], n_classes,
                        tuple(np.asarray(x).shape[1:3]), model_vector(init_model, layout),
                        float(c.lr), steps, int(rec.n_samples), True, {})
    return ProtocolUpdate(payload, public, np.asarray(x), np.asarray(y, dtype=np.int64), rec,
                          inst.last_upload, res)


def protocol_leakage(data: ImageSet, n_classes: int, models: dict, cfg: CollabConfig,
                     thetas: Sequence[float], rules: Sequence[str] = ("largest",), *,
                     batch: int = 4, institutions: int = 2,
                     attackers: Sequence[str] = ("naive", "mask_aware"),
                     methods: Sequence[str] = ("ig",), steps: dict | None = None,
                     chain: str | None = "embedded", seed: int = 0) -> LeakageRun:
    """The protocol setting: for each θu × rule a one-round chain run (:func:`protocol_update`)
    with ``institutions`` institutions of ``batch`` images each from ``data``, starting from
    ``models[(θu, rule)]`` (the trained global model; θu = 1 under any rule), training as ``cfg``
    says (local_epochs, batch_size, lr, optimizer) with that θu / rule; institution 0's on-chain
    update is attacked. Returns a :class:`LeakageRun` (chain: ledger address, block hash)."""
    steps = dict(steps or {})
    idx = pick_images(data, batch * institutions, seed)
    batches = [(data.images[idx[i::institutions]], data.labels[idx[i::institutions]])
               for i in range(institutions)]
    run = LeakageRun([])
    for t, rule in _runs(thetas, rules):
        model = models.get((t, rule))
        if model is None and t == 1.0:
            model = next(v for k, v in models.items() if k[0] == 1.0)
        c = CollabConfig(**{**cfg.to_dict(), "theta_u": t, "select_rule": rule})
        up = protocol_update(batches, n_classes, model, c, chain=chain)
        run.payloads[("protocol", t, rule, 0)] = up.payload
        run.chain[f"{t:g}/{rule}"] = {"ledger_address": up.collab.ledger_address,
                                     "final_block_hash": up.collab.final_block_hash,
                                     "digest": up.record.digest.hex(),
                                     "payload_bytes": len(up.payload)}
        case = InversionCase(up.payload, up.public, up.images, up.labels, "protocol",
                             {"theta_u": t, "rule": rule})
        run.rows += _attack_rows(up.payload, case, setting="protocol", theta_u=t, rule=rule,
                                 attackers=attackers, methods=methods, steps=steps, seed=seed,
                                 image_id=-1, store=run.recon,
                                 extra={"local_epochs": c.local_epochs, "batch": batch,
                                        "optimizer": c.optimizer})
    return run


def mean_image_baseline(train: ImageSet, images: np.ndarray) -> dict:
    """PSNR / SSIM of the data set's mean training image against ``images``: what an attacker
    gets with no update at all (a reconstruction must beat it to show any leakage)."""
    mean = train.images.astype(np.float64).mean(0).round().astype(np.uint8)
    ref = np.repeat(mean[None], len(images), 0)
    return {"psnr": float(np.mean(psnr_fn(ref, images))), "ssim": float(np.mean(ssim_fn(ref, images)))}


# --------------------------------------------------------------------------------------------
# (3) membership inference

def membership_sweep(sweep: UtilitySweep, institutions: list[InstitutionData], *, n: int = 500,
                     lira_shadows: int = 0, shadow_epochs: int = 5, cfg: CollabConfig | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Membership inference on each run's shared global model: members are ``n`` training images
    of the institutions, non-members ``n`` images of their test splits (disjoint). Yeom's loss
    attack always (threshold: mean member loss); with ``lira_shadows ≥ 2`` also LiRA (online,
    pooled variance), its shadow models trained once (centralized, ``shadow_epochs`` epochs with
    ``cfg``'s model / optimizer / lr) on random halves of members ∪ non-members and reused for
    every θu. Returns rows theta_u, rule, attack, auc, tpr@1%fpr, tpr@0.1%fpr, ..."""
    rng = np.random.default_rng(seed)
    train = ImageSet.concat([d.train for d in institutions])
    test = ImageSet.concat([d.test for d in institutions])
    k = min(n, len(train), len(test))
    members = train.subset(np.sort(rng.choice(len(train), k, replace=False)))
    nonmembers = test.subset(np.sort(rng.choice(len(test), k, replace=False)))
    cand = ImageSet.concat([members, nonmembers])
    is_member = np.r_[np.ones(k, bool), np.zeros(k, bool)]
    shadow = None
    if lira_shadows >= 2:
        cfg = cfg or CollabConfig()
        keep = np.argsort(rng.random((lira_shadows, len(cand))), axis=0) < lira_shadows // 2
        conf = np.zeros((lira_shadows, len(cand)))
        for s in range(lira_shadows):
            m = build_model(cfg.model, cand.n_channels, int(cand.labels.max()) + 1, seed * 1000 + s)
            tc = TrainConfig(epochs=shadow_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                             optimizer=cfg.optimizer, lr_floor=cfg.lr_floor, seed=seed * 1000 + s)
            train_epochs(m, cand.subset(np.flatnonzero(keep[s])), tc)
            conf[s] = logit_confidence(m, cand)
        shadow = (conf, keep)
    rows = []
    for (t, rule), res in sweep.runs.items():
        r = loss_attack(res.model, members, nonmembers)
        r.extra.pop("threshold", None)
        thr = float(r.extra["mean_loss_members"])
        r = loss_attack(res.model, members, nonmembers, threshold=thr)
        rows.append({"theta_u": t, "rule": rule, **r.as_dict()})
        if shadow is not None:
            scores = lira_scores(logit_confidence(res.model, cand), shadow[0], shadow[1])
            auc, tpr = mia_metrics(scores, is_member)
            rows.append({"theta_u": t, "rule": rule, "attack": "lira", "auc": auc,
                         **{f"tpr@{100 * f:g}%fpr": v for f, v in tpr.items()},
                         "n_members": k, "n_nonmembers": k, "n_shadow": lira_shadows})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# (5) the claim's numbers

def _best(leak: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, θu, rule, attacker): mean over images of each method, then the best method
    (highest mean PSNR) — the attacker picks its strongest attack. PSNR NaN: the payload revealed
    nothing to invert (ranked last)."""
    per = (leak.groupby(["setting", "theta_u", "rule", "attacker", "method"], as_index=False)
           [["psnr", "ssim", "mse", "label_acc"]].mean())
    rank = per.psnr.fillna(-np.inf)
    idx = rank.groupby([per[k] for k in ("setting", "theta_u", "rule", "attacker")]).idxmax()
    return per.loc[idx].reset_index(drop=True)


def summarize(utility: pd.DataFrame, leak: pd.DataFrame, mia: pd.DataFrame | None = None, *,
              baseline: dict | None = None, bar: float = PSNR_BAR, acc_tolerance: float = 0.02,
              rule: str = "largest") -> dict:
    """The numbers that decide claim 2, and its verdicts.

    utility: :attr:`UtilitySweep.rows` as a table; leak: attack rows of both settings; mia:
    :func:`membership_sweep`'s table; baseline: :func:`mean_image_baseline`.
    theta_star: the largest θu (under ``rule``) from which on — at it and at every smaller θu measured —
    the best worst-case mask-aware attack stays below ``bar`` dB PSNR; acc_cost: ACC(θu = 1) − ACC(θu*).
    not_protected: every measured (setting, rule, attacker, method, θu < 1) whose mean PSNR is
    ≥ ``bar``, flagged ``beats_mean_image`` when it also beats the mean-image baseline.
    """
    u = pd.DataFrame(utility)
    acc1 = float(u[u.theta_u == 1.0].acc.iloc[0])

    def acc_at(t, r=rule):
        s = u[(u.theta_u == t) & ((u.rule == r) | (u.theta_u == 1.0))]
        return float(s.acc.iloc[0]) if len(s) else None

    best = _best(leak)
    wc = best[(best.setting == "worst_case") & (best.attacker == "mask_aware")
              & ((best.rule == rule) | (best.theta_u == 1.0))].sort_values("theta_u", ascending=False)
    theta_star = None
    for t in wc.theta_u:
        if not (wc[wc.theta_u <= t].psnr >= bar).any():   # NaN: nothing to invert, protected
            theta_star = float(t)
            break
    per_theta = {}
    for t in sorted(set(u.theta_u), reverse=True):
        d = {"acc": {r: float(v) for r, v in u[u.theta_u == t].groupby("rule").acc.mean().items()},
             "auc": {r: float(v) for r, v in u[u.theta_u == t].groupby("rule").auc.mean().items()}}
        b = best[best.theta_u == t]
        d["attack"] = {f"{s.setting}/{s.rule}/{s.attacker}": {"method": s.method, "psnr": s.psnr,
                                                               "ssim": s.ssim, "mse": s.mse,
                                                               "label_acc": s.label_acc}
                       for s in b.itertuples()}
        if mia is not None and len(mia):
            m = mia[mia.theta_u == t]
            d["mia"] = {f"{r['attack']}/{r['rule']}": {k: r[k] for k in ("auc", "tpr@1%fpr", "tpr@0.1%fpr")}
                        for r in m.to_dict("records")}
        per_theta[f"{t:g}"] = d
    per = (leak.groupby(["setting", "theta_u", "rule", "attacker", "method"], as_index=False)
           [["psnr", "ssim"]].mean())
    bad = per[(per.theta_u < 1.0) & (per.psnr >= bar)]
    base_psnr = baseline["psnr"] if baseline else None
    not_protected = [{"setting": s.setting, "theta_u": s.theta_u, "rule": s.rule,
                      "attacker": s.attacker, "method": s.method, "psnr": s.psnr, "ssim": s.ssim,
                      "beats_mean_image": bool(base_psnr is not None and s.psnr > base_psnr)}
                     for s in bad.itertuples()]
    full = best[best.theta_u == 1.0]
    out = {
        "psnr_bar_db": bar,
        "mean_image_baseline": baseline,
        "acc_theta_1": acc1,
        "theta_star": theta_star,
        "acc_at_theta_star": acc_at(theta_star) if theta_star is not None else None,
        "acc_cost_at_theta_star": (acc1 - acc_at(theta_star)) if theta_star is not None else None,
        "worst_case_mask_aware_psnr": {f"{t:g}": float(p) for t, p in zip(wc.theta_u, wc.psnr)},
        "full_update_psnr": {f"{s.setting}/{s.attacker}": float(s.psnr) for s in full.itertuples()},
        "acc_theta_0.1": acc_at(0.1),
        "acc_drop_theta_0.1": (acc1 - acc_at(0.1)) if acc_at(0.1) is not None else None,
        "per_theta": per_theta,
        "not_protected": not_protected,
    }
    out["holds"] = bool(theta_star is not None and out["acc_cost_at_theta_star"] <= acc_tolerance)
    out["acc_0.1_within_tolerance"] = (None if out["acc_drop_theta_0.1"] is None
                                       else bool(out["acc_drop_theta_0.1"] <= acc_tolerance))
    return out


def run_seed(dataset, *, seed: int, cfg: CollabConfig, partition_scheme: str = "iid", institutions: int = 5,
             thetas: Sequence[float] = (1.0, 0.1), rules: Sequence[str] = ("largest",),
             attack_methods: Sequence[str] = ("idlg",), attack_steps: dict | None = None,
             n_attack_images: int = 1, protocol: dict | None = None, protocol_methods: Sequence[str] = ("ig",),
             mia_n: int = 300, lira_shadows: int = 0, chain: str | None = "embedded",
             keep_recon: bool = False) -> dict:
    """One seed of claim 2: the seed draws the partition, the initialization and shuffling, the
    attacked images and the attacks' initialization. protocol: CollabConfig overrides of the
    protocol attack setting (local_epochs, batch_size, optimizer, lr). Returns plain data:
    {seed, utility, leak, mia (DataFrames tagged with the seed), baseline, protocol_chain, recon}."""
    from medchain.data import partition

    cfg = replace(cfg, seed=seed)
    insts = partition(dataset, None if partition_scheme == "sites" else institutions, partition_scheme, seed=seed)
    util = utility_sweep(insts, dataset.n_classes, cfg, thetas, rules, chain=chain)
    idx = pick_images(dataset.train, n_attack_images, seed)
    images, labels = dataset.train.images[idx], dataset.train.labels[idx]
    wc = worst_case_leakage(images, labels, dataset.n_classes, thetas, rules, methods=attack_methods,
                            steps=attack_steps, seed=seed)
    pcfg = CollabConfig(**{**cfg.to_dict(), **(protocol or {})})
    pr = protocol_leakage(dataset.train, dataset.n_classes, {k: r.model for k, r in util.runs.items()}, pcfg,
                          thetas, rules, batch=pcfg.batch_size, methods=protocol_methods, steps=attack_steps,
                          chain=chain, seed=seed)
    mia = membership_sweep(util, insts, n=mia_n, lira_shadows=lira_shadows, cfg=cfg, seed=seed)
    return {"seed": seed, "utility": pd.DataFrame(util.rows).assign(seed=seed),
            "leak": pd.DataFrame(wc.rows + pr.rows).assign(seed=seed), "mia": mia.assign(seed=seed),
            "baseline": mean_image_baseline(dataset.train, images), "protocol_chain": pr.chain,
            "recon": {**wc.recon, **pr.recon} if keep_recon else {}}


def summarize_seeds(seed_runs: list[dict], *, theta: float = 0.1, rule: str = "largest",
                    acc_tolerance: float = 0.02, psnr_tolerance_db: float = 1.0) -> dict:
    """Claim 2 over seeds, decided at one θu: (a) utility — ACC(θu) − ACC(1), paired by seed,
    non-inferior within ``acc_tolerance``; (b) leakage — the worst attacked image's PSNR under the
    strongest mask-aware worst-case attack, against the mean-image baseline on the same images:
    baseline − attack must be non-inferior within ``psnr_tolerance_db`` (the attack recovers no
    more than guessing the average patient). A payload with nothing to invert (PSNR NaN) scores as
    the baseline. Balanced ACC and AUC are decided like (a) and reported. Per-seed
    :func:`summarize` outputs are kept under "per_seed"."""
    per_seed = [summarize(r["utility"], r["leak"], r["mia"], baseline=r["baseline"], rule=rule)
                for r in seed_runs]
    decisions = []
    for metric in ("acc", "balanced_acc", "auc"):
        diffs = []
        for r in seed_runs:
            u = r["utility"]
            at = u[np.isclose(u.theta_u, theta) & (u.rule == rule)]
            full = u[u.theta_u == 1.0]
            if at.empty or full.empty:
                raise ValueError(f"the sweep needs θu = 1 and θu = {theta:g} (rule {rule}) to decide claim 2")
            diffs.append(float(at[metric].iloc[0]) - float(full[metric].iloc[0]))
        decisions.append(stats.non_inferiority(diffs, acc_tolerance, metric=metric,
                                               a=f"θu = {theta:g}", b="θu = 1"))
    margins, worst = [], []
    for r in seed_runs:
        leak = r["leak"]
        wc = leak[(leak.setting == "worst_case") & (leak.attacker == "mask_aware") & (leak.rule == rule)
                  & np.isclose(leak.theta_u, theta)]
        if wc.empty:
            raise ValueError(f"no mask-aware worst-case attack at θu = {theta:g} (rule {rule}) to decide claim 2")
        strongest = wc.groupby("method").psnr.mean().fillna(-np.inf).idxmax()
        psnr = wc[wc.method == strongest].psnr.fillna(r["baseline"]["psnr"])
        worst.append(float(psnr.max()))
        margins.append(r["baseline"]["psnr"] - float(psnr.max()))
    decisions.append(stats.non_inferiority(margins, psnr_tolerance_db, metric="psnr", unit="dB",
                                           a="mean-image baseline", b="worst-image attack"))
    verdict = stats.claim_verdict(
        f"claim 2 (θu = {theta:g}, rule {rule}): partial update keeps the worst-case mask-aware inversion "
        f"no better than the mean image (within {psnr_tolerance_db:g} dB) at ≤ {100 * acc_tolerance:g} points "
        "of ACC cost", decisions, deciding_metric=("acc", "psnr"),
        why_metric="ACC for the cost (the paper's measure); PSNR of the worst attacked image against the "
                   "mean-image baseline for the leakage")
    u = pd.concat([r["utility"] for r in seed_runs], ignore_index=True)
    per_theta = {f"{t:g}/{rr}": {m: stats.describe(g[m].to_numpy()) for m in ("acc", "balanced_acc", "auc")}
                 for (t, rr), g in u.groupby(["theta_u", "rule"])}
    return {"verdict": verdict, "theta": theta, "rule": rule, "per_theta": per_theta,
            "worst_image_psnr": worst, "mean_image_psnr": [r["baseline"]["psnr"] for r in seed_runs],
            "per_seed": per_seed}


# --------------------------------------------------------------------------------------------
# (4) figures

def _theta_axis(ax, thetas):
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(thetas)))
    ax.set_xticklabels([f"{t:g}" for t in sorted(set(thetas))])
    ax.invert_xaxis()
    ax.set_xlabel("θu (fraction of each update shared)")
    ax.grid(alpha=0.3)


def _with_full(df: pd.DataFrame, rules) -> pd.DataFrame:
    """Copy the θu = 1 rows to every rule so that each rule's line starts at θu = 1."""
    full = df[df.theta_u == 1.0]
    return pd.concat([df[df.theta_u < 1.0]] + [full.assign(rule=r) for r in rules], ignore_index=True)


def plot_accuracy(utility: pd.DataFrame, mia: pd.DataFrame | None = None):
    """(a) final pooled-test ACC vs θu per rule; with ``mia``, a second panel: MIA AUC vs θu."""
    u = pd.DataFrame(utility)
    rules = list(dict.fromkeys(u.rule))
    n = 2 if mia is not None and len(mia) else 1
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), squeeze=False)
    ax = axes[0][0]
    for r, g in _with_full(u, rules).groupby("rule"):
        g = g.groupby("theta_u")[["acc", "auc"]].agg(["mean", "std"]).fillna(0.0)   # over seeds
        ax.errorbar(g.index, g["acc"]["mean"], yerr=g["acc"]["std"], fmt="o-", capsize=3, label=f"ACC, rule {r}")
        ax.errorbar(g.index, g["auc"]["mean"], yerr=g["auc"]["std"], fmt="s--", capsize=3, alpha=0.6,
                    label=f"AUC, rule {r}")
    _theta_axis(ax, u.theta_u)
    ax.set_ylabel("pooled test score")
    n_seeds = u["seed"].nunique() if "seed" in u else 1
    ax.set_title(f"(a) utility vs θu (mean ± SD over {n_seeds} seed{'s' if n_seeds != 1 else ''})")
    ax.legend(fontsize=8)
    if n == 2:
        plot_membership(mia, ax=axes[0][1])
    fig.tight_layout()
    return fig


def plot_membership(mia: pd.DataFrame, ax=None):
    """MIA AUC and TPR at 1 % FPR vs θu, per attack and rule."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
    rules = list(dict.fromkeys(mia.rule))
    for (a, r), g in _with_full(mia, rules).groupby(["attack", "rule"]):
        g = g.sort_values("theta_u")
        ax.plot(g.theta_u, g.auc, "o-", label=f"AUC {a} ({r})")
        ax.plot(g.theta_u, g["tpr@1%fpr"], "x:", label=f"TPR@1%FPR {a} ({r})")
    ax.axhline(0.5, color="gray", lw=0.8)
    _theta_axis(ax, mia.theta_u)
    ax.set_title("membership inference on the global model")
    ax.legend(fontsize=7)
    return ax.figure if own else ax


def plot_leakage(leak: pd.DataFrame, baseline: dict | None = None, bar: float = PSNR_BAR):
    """(b) best-method PSNR and SSIM vs θu, one line per attacker × rule, one column per setting."""
    best = _best(leak)
    settings = list(dict.fromkeys(best.setting))
    rules = list(dict.fromkeys(best.rule))
    fig, axes = plt.subplots(2, len(settings), figsize=(5.2 * len(settings), 6.6), squeeze=False)
    for j, s in enumerate(settings):
        b = _with_full(best[best.setting == s], rules)
        for k, metric in enumerate(("psnr", "ssim")):
            ax = axes[k][j]
            for (a, r), g in b.groupby(["attacker", "rule"]):
                g = g.sort_values("theta_u")
                ax.plot(g.theta_u, g[metric], "o-" if a == "mask_aware" else "s--",
                        label=f"{a}, {r}")
            if metric == "psnr":
                ax.axhline(bar, color="red", lw=0.8, ls=":", label=f"{bar:g} dB")
            if baseline:
                ax.axhline(baseline[metric], color="gray", lw=0.8, ls="--", label="mean image")
            _theta_axis(ax, b.theta_u)
            ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
            if k == 0:
                ax.set_title(f"(b) inversion, setting: {s.replace('_', ' ')}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_frontier(utility: pd.DataFrame, leak: pd.DataFrame, setting: str = "worst_case",
                  attacker: str = "mask_aware"):
    """(c) privacy–utility frontier: ACC vs attack PSNR (best method), one point per θu."""
    u = pd.DataFrame(utility)
    best = _best(leak)
    b = best[(best.setting == setting) & (best.attacker == attacker)]
    rules = list(dict.fromkeys(u.rule))
    u = _with_full(u, rules).groupby(["theta_u", "rule"], as_index=False).acc.mean()   # over seeds
    m = u.merge(_with_full(b, rules), on=["theta_u", "rule"])
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for r, g in m.groupby("rule"):
        g = g.sort_values("theta_u")
        ax.plot(g.psnr, g.acc, "o-", label=f"rule {r}")
        for s in g.itertuples():
            ax.annotate(f"θu={s.theta_u:g}", (s.psnr, s.acc), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(PSNR_BAR, color="red", lw=0.8, ls=":")
    ax.set_xlabel(f"attack PSNR (dB), {setting.replace('_', ' ')}, {attacker}")
    ax.set_ylabel("pooled test ACC")
    ax.set_title("(c) privacy–utility frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_reconstructions(recon: dict, setting: str = "worst_case", attacker: str = "mask_aware",
                         rule: str = "largest", method: str | None = None, max_images: int = 4):
    """(d) originals (top row) and reconstructions at each θu (one row per θu)."""
    keys = [k for k in recon if k[0] == setting and k[3] == attacker
            and (k[2] == rule or k[1] == 1.0) and (method is None or k[4] == method)]
    if method is None and keys:
        method = keys[0][4]
        keys = [k for k in keys if k[4] == method]
    keys = sorted(keys, key=lambda k: -k[1])
    if not keys:
        raise ValueError("no reconstructions for that setting / attacker / rule")
    orig = recon[keys[0]][0][:max_images]
    n = len(orig)
    fig, axes = plt.subplots(len(keys) + 1, n, figsize=(1.4 * n + 0.8, 1.4 * (len(keys) + 1)),
                             squeeze=False)
    rows = [("original", orig)] + [(f"θu={k[1]:g}", recon[k][1][:max_images]) for k in keys]
    for i, (name, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"(d) {method}, {attacker}, {setting.replace('_', ' ')}, rule {rule}", fontsize=9)
    fig.tight_layout()
    return fig
