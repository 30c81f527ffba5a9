"""Claim 2: partial parameter update (sharing a fraction θu of each update) prevents indirect
leakage of patient images through what the chain reveals, at little cost in accuracy.
Used by notebooks/02_partial_update_privacy.ipynb; the verdict and figures are in
:mod:`medchain.experiments.privacy_summary`.

One threat model for every number: the model the task trains (the ``cnn``), the updates the
protocol posts (:class:`medchain.protocol.Institution`, read back from the ledger), and every
defence run on the same partition and seeds:

* :func:`defence_runs` — collaborative training on chain once per defence (a dict name →
  :class:`~medchain.protocol.CollabConfig` overrides: θu, selection rule, γ / σ, BN-statistics
  policy); final pooled-test ACC / balanced ACC / AUC and what each update carries.
* :func:`protocol_leakage` — per defence and attacked image: the target institution holds that
  image (the smallest batch, the attack's best case) and runs one round of the task from the
  defence's trained global model (:func:`medchain.experiments.posted_update.protocol_case`); the payload is
  attacked mask-aware with Inverting Gradients (+ Yin et al.'s BN prior and the BN statistics alone
  when the payload reveals them). Per image: PSNR, SSIM, the mean image's PSNR / SSIM on the same
  image, and the re-identification rank of the true image among every training image
  (:func:`medchain.metrics.reidentification_rank`).
* :func:`worst_case_leakage` — the labelled upper bound of the literature: one image, one gradient
  step of an untrained sigmoid LeNet (:meth:`InversionCase.worst_case`), iDLG.
* :func:`membership_sweep` — membership inference on each defence's final global model (Yeom's
  loss attack; LiRA with centrally trained shadows when asked); on the per-round, per-institution
  updates the chain shows: the loss-difference attack and LiRA with shadow updates trained the
  same federated way (:mod:`medchain.experiments.update_membership`).

DP-SGD (``dp_epsilon``, :mod:`medchain.dp`) needs a model without BatchNorm: its points and their
no-defence reference ``none_tanh`` use the ``cnn_tanh`` (Papernot et al. 2021's DP model) with SGD;
the other defences the BatchNorm ``cnn`` the task trains. Each defence's ACC cost is taken against
the no-defence run of its own model (:func:`reference_of`).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from medchain.attacks import (InversionCase, NothingToInvert, decode_target, invert, logit_confidence,
                              loss_attack, mia_metrics)
from medchain.attacks.membership import lira_scores
from medchain.experiments.posted_update import protocol_case
from medchain.experiments.update_membership import update_lira, update_membership
from medchain.data.types import ImageSet, InstitutionData
from medchain.metrics import psnr as psnr_fn
from medchain.metrics import reidentification_rank
from medchain.metrics import ssim as ssim_fn
from medchain.models import build_model
from medchain.params import model_vector
from medchain.privacy import trainable_mask
from medchain.protocol import CollabConfig, run_collaborative
from medchain.training import TrainConfig, to_tensor, train_epochs

__all__ = ["DEFENCES", "reference_of", "defence_runs", "pick_images", "protocol_leakage", "worst_case_leakage",
           "membership_sweep", "update_membership", "mean_image", "run_seed", "ATTACK_BUDGET"]

# DP-SGD needs per-sample gradients, which BatchNorm does not have: the DP points and their own
# no-defence reference use the tanh CNN of the DP literature (no normalisation), trained with SGD
# as DP-SGD is; lr 0.5 (momentum 0.9) from a seed-0 pilot of 12 rounds (results/README.md)
_DP_FAMILY = {"model": "cnn_tanh", "theta_u": 1.0, "optimizer": "sgd", "lr": 0.5}

#: The defences compared on the same chain and seeds (CollabConfig overrides).
DEFENCES = {
    "none": {"theta_u": 1.0, "bn_stats": "shared"},
    "bn_local": {"theta_u": 1.0, "bn_stats": "local"},
    "partial_largest": {"theta_u": 0.1, "select_rule": "largest", "bn_stats": "shared"},
    "partial_random": {"theta_u": 0.1, "select_rule": "random", "bn_stats": "shared"},
    "partial_largest_bn_local": {"theta_u": 0.1, "select_rule": "largest", "bn_stats": "local"},
    "partial_clip_noise": {"theta_u": 0.1, "select_rule": "largest", "gamma": 1e-3, "sigma": 1e-3,
                           "bn_stats": "local"},
    "none_tanh": dict(_DP_FAMILY),
    **{f"dp_eps{eps:g}": {**_DP_FAMILY, "dp_epsilon": eps} for eps in (8.0, 3.0, 1.0)},
}

#: What the literature spends per image, for the record (Geiping et al. 2020: 24 000 Adam
#: iterations × 8 restarts on ImageNet ResNets, 4 800 on CIFAR; Yin et al. 2021: 20 000 × 4
#: restarts per batch; Zhu et al. 2019: 300 L-BFGS steps for DLG).
ATTACK_BUDGET = {"geiping2020": {"iterations": 24000, "restarts": 8},
                 "yin2021": {"iterations": 20000, "restarts": 4},
                 "zhu2019_dlg": {"iterations": 300, "restarts": 1}}


def mean_image(train: ImageSet) -> np.ndarray:
    """The data set's mean training image, uint8 (H, W[, C]): what an attacker knows without any
    update (it re-identifies no one and is the PSNR / SSIM baseline)."""
    return train.images.astype(np.float64).mean(0).round().astype(np.uint8)


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


def reference_of(name: str, defences: dict, cfg: CollabConfig) -> str | None:
    """The no-defence run of ``name``'s model among ``defences`` (θu = 1, no γ / σ / DP, BN
    statistics shared), or None when there is none."""
    model = _config(cfg, defences[name]).model
    for other, over in defences.items():
        c = _config(cfg, over)
        if (c.model == model and c.theta_u == 1 and c.gamma is None and not c.sigma and c.dp_epsilon is None
                and c.bn_stats == "shared"):
            return other
    return None


def _config(cfg: CollabConfig, overrides: dict) -> CollabConfig:
    bad = set(overrides) - set(cfg.to_dict())
    if bad:
        raise ValueError(f"unknown task parameter(s) {sorted(bad)} in a defence; use CollabConfig's fields")
    return CollabConfig(**{**cfg.to_dict(), **overrides})


# --------------------------------------------------------------------------------------------
# (1) utility: one chain run per defence

def defence_runs(institutions: list[InstitutionData], n_classes: int, cfg: CollabConfig,
                 defences: dict, *, chain: str | None = "embedded",
                 snapshot_rounds: Sequence[int] = ()) -> tuple[list[dict], dict]:
    """Collaborative training once per defence (``cfg`` with the defence's overrides).
    Returns (rows: defence, acc, balanced_acc, auc, loss, values / BN values per update, the
    chain's ledger address and final block hash, wall_s; runs: defence → CollabResult). For each
    round r of ``snapshot_rounds`` the global model it started from is kept in
    ``runs[defence].snapshots[r]`` (float32 (P,)), for :func:`update_membership`."""
    rows, runs = [], {}
    for name, over in defences.items():
        c = _config(cfg, over)
        snaps = {}
        if 0 in snapshot_rounds:
            probe = build_model(c.model, institutions[0].train.n_channels, n_classes, c.seed)
            snaps[0] = model_vector(probe)

        def keep(r, insts, snaps=snaps):
            if r + 1 in snapshot_rounds:
                snaps[r + 1] = insts[0].global_vec.copy()

        res = run_collaborative(institutions, n_classes, c, chain=chain, round_callback=keep)
        res.snapshots = snaps
        runs[name] = res
        last, inst = res.history[-1], res.institutions[0]
        buffers = ~trainable_mask(inst.layout)
        n_vals = [len(i.last_upload[1]) for i in res.institutions]
        n_bn = [int(buffers.sum()) if ix is None else int(buffers[ix].sum())    # None: all shared
                for ix in (i.last_upload[0] for i in res.institutions)]
        spent = [i.accountant.get_epsilon(i.dp_plan.delta) for i in res.institutions if i.dp_plan is not None]
        rows.append({"defence": name, **{k: over.get(k, c.to_dict()[k]) for k in
                                         ("model", "optimizer", "lr", "theta_u", "select_rule", "gamma",
                                          "sigma", "bn_stats", "dp_epsilon")},
                     "dp_epsilon_spent": max(spent) if spent else None,
                     "dp_noise_multiplier": float(np.mean([i.dp_plan.noise_multiplier for i in res.institutions]))
                     if spent else None,
                     "acc": last["acc"], "balanced_acc": last.get("balanced_acc"), "auc": last["auc"],
                     "loss": last.get("loss"), "rounds": len(res.history),
                     "values_per_update": float(np.mean(n_vals)), "bn_values_per_update": float(np.mean(n_bn)),
                     "ledger_address": res.ledger_address, "final_block_hash": res.final_block_hash,
                     "wall_s": res.wall_s})
    return rows, runs


# --------------------------------------------------------------------------------------------
# (2) leakage

def _score(rec_u8: np.ndarray, orig: np.ndarray, true_index: np.ndarray, pool: np.ndarray,
           mean: np.ndarray) -> list[dict]:
    """Per image: psnr, ssim (of the matched reconstruction), the mean image's psnr / ssim and
    the re-identification rank among ``pool``."""
    ranks = reidentification_rank(rec_u8, true_index, pool, mean)
    ref = np.repeat(mean[None], len(orig), 0)
    p, s = psnr_fn(rec_u8, orig), ssim_fn(rec_u8, orig)
    mp, ms = psnr_fn(ref, orig), ssim_fn(ref, orig)
    return [{"image": int(t), "psnr": float(a), "ssim": float(b), "mean_psnr": float(c),
             "mean_ssim": float(d), "rank": int(r), "pool_size": int(len(pool)),
             "reid_percentile": 1.0 - (int(r) - 1) / max(1, len(pool) - 1)}
            for t, a, b, c, d, r in zip(true_index, p, s, mp, ms, ranks)]


def protocol_leakage(train: ImageSet, n_classes: int, models: dict, cfg: CollabConfig, defences: dict,
                     image_idx: np.ndarray, *, steps: int = 200, bn_prior: float = 1.0,
                     chain: str | None = None, seed: int = 0, keep_recon: bool = False,
                     dp_plans: dict | None = None) -> tuple[list[dict], dict]:
    """Attack the update the protocol posts, per defence and image of ``train[image_idx]``.

    models: defence → the trained global model the round starts from; ``dp_plans``: defence → the
    DP-SGD plan of the institution the attacked image stands in for (its real noise multiplier and
    clip bound; None: no DP). The attacker (mask-aware,
    Inverting Gradients, ``steps`` Adam steps, one restart) starts from noise (TV 0.1) when the
    payload reveals no BN statistics, else from the mean image with the BN prior (``bn_prior``,
    TV 0.01), and then also inverts the BN statistics alone (``bn_only``, as many steps).
    Returns (rows, recon: (defence, attack) → (originals, reconstructions) when ``keep_recon``).
    """
    mean = mean_image(train)
    init = to_tensor(mean[None])[0].numpy()
    rows, recon = [], {}
    for name, over in defences.items():
        c = _config(cfg, over)
        for j in image_idx:
            x, y = train.images[j:j + 1], train.labels[j:j + 1]
            case = protocol_case(x, y, model=models[name], cfg=c, num_classes=n_classes, chain=chain,
                                 dp_plan=(dp_plans or {}).get(name))
            has_bn = bool(decode_target(case.payload, case.public).bn_stats)
            attacks = {"ig": (dict(bn_prior=bn_prior, init=init, tv=1e-2) if has_bn else dict(tv=1e-1), steps)}
            if has_bn:
                attacks["bn_only"] = (dict(bn_prior=bn_prior, init=init, tv=1e-2, bn_only=True), steps)
            for attack, (kw, n_steps) in attacks.items():
                base = {"setting": "protocol", "defence": name, "attack": attack, "bn_revealed": has_bn,
                        "n_shared": case.selection["n_shared"], "payload_bytes": case.selection["payload_bytes"]}
                try:
                    rec = invert(case.payload, case, "ig", "mask_aware", steps=n_steps, seed=seed, **kw)
                except NothingToInvert:   # nothing revealed: the attacker is left with the mean image
                    rec_u8, secs, lab = mean[None], 0.0, None
                else:
                    rec_u8, secs, lab = rec.images, rec.metrics["cpu_seconds"], rec.metrics.get("label_acc")
                for r in _score(rec_u8, x, np.array([j]), train.images, mean):
                    rows.append({**base, **r, "label_acc": lab, "seconds": secs, "steps": n_steps})
                if keep_recon:
                    o, q = recon.get((name, attack), (x[:0], rec_u8[:0]))
                    recon[(name, attack)] = (np.concatenate([o, x]), np.concatenate([q, rec_u8]))
    return rows, recon


def worst_case_leakage(train: ImageSet, n_classes: int, image_idx: np.ndarray, thetas: Sequence[float],
                       *, steps: int = 50, lr: float = 0.1, seed: int = 0) -> list[dict]:
    """The literature's upper bound (labelled ``setting="worst_case"``): one image, one gradient step
    of an untrained sigmoid LeNet, θu of its parameters shared (largest), mask-aware iDLG."""
    mean = mean_image(train)
    rows = []
    for t in thetas:
        for j in image_idx:
            x, y = train.images[j:j + 1], train.labels[j:j + 1]
            case = InversionCase.worst_case(x, y, num_classes=n_classes, theta_u=float(t), lr=lr, seed=seed)
            rec = invert(case.payload, case, "idlg", "mask_aware", steps=steps, seed=seed)
            for r in _score(rec.images, x, np.array([j]), train.images, mean):
                rows.append({"setting": "worst_case", "defence": f"lenet_theta_{float(t):g}", "attack": "idlg",
                             "bn_revealed": False, "n_shared": case.selection["n_shared"], **r,
                             "label_acc": rec.metrics.get("label_acc"), "seconds": rec.metrics["cpu_seconds"],
                             "steps": steps})
    return rows


# --------------------------------------------------------------------------------------------
# (3) membership inference

def membership_sweep(runs: dict, institutions: list[InstitutionData], *, n: int = 500,
                     lira_shadows: int = 0, shadow_epochs: int = 5, cfg: CollabConfig | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Membership inference on each defence's final global model: members are ``n`` training
    images of the institutions, non-members ``n`` images of their test splits. Yeom's loss attack
    (threshold: mean member loss); with ``lira_shadows ≥ 2`` also LiRA (online, pooled variance,
    shadows trained centrally with ``cfg``'s model / optimizer). Rows: defence, attack, auc,
    tpr@1%fpr, tpr@0.1%fpr, ... (Per-round, per-institution update attacks are not measured.)"""
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
    for name, res in runs.items():
        r = loss_attack(res.model, members, nonmembers)
        thr = float(r.extra["mean_loss_members"])
        r = loss_attack(res.model, members, nonmembers, threshold=thr)
        rows.append({"defence": name, **r.as_dict()})
        if shadow is not None:
            scores = lira_scores(logit_confidence(res.model, cand), shadow[0], shadow[1])
            auc, tpr = mia_metrics(scores, is_member)
            rows.append({"defence": name, "attack": "lira", "auc": auc,
                         **{f"tpr@{100 * f:g}%fpr": v for f, v in tpr.items()},
                         "n_members": k, "n_nonmembers": k, "n_shadow": lira_shadows})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# one seed

def _only_rounds(res, rounds):
    """A shallow copy of a CollabResult whose ``snapshots`` hold only ``rounds``."""
    out = copy.copy(res)
    out.snapshots = {r: v for r, v in res.snapshots.items() if r in set(rounds)}
    return out


def run_seed(dataset, *, seed: int, cfg: CollabConfig, defences: dict | None = None,
             partition_scheme: str = "iid", institutions: int = 5, n_attack_images: int = 4,
             attack_steps: int = 200, bn_prior: float = 1.0, worst_case_thetas: Sequence[float] = (1.0, 0.1),
             worst_case_steps: int = 50, mia_n: int = 300, lira_shadows: int = 0,
             update_mia_rounds: Sequence[int] | None = None, update_mia_n: int = 150,
             update_shadows: int = 16, update_shadow_rounds: Sequence[int] | None = None,
             chain: str | None = "embedded", attack_chain: str | None = None, keep_recon: bool = False) -> dict:
    """One seed of claim 2: the seed draws the partition, the initialization and shuffling, the
    attacked images and the attacks' initialization. Every defence trains on the same partition;
    the protocol attack runs each defence's round on ``attack_chain`` (None: the in-memory ledger,
    the same Institution code). Membership on the posted updates: the loss-difference attack on
    ``update_mia_rounds`` (default: first, middle, last) for every institution, and LiRA with
    ``update_shadows`` shadow updates (0: off) on institution 0's updates of
    ``update_shadow_rounds`` (default: the same rounds). Returns plain data: {seed, utility, leak,
    mia (DataFrames tagged with the seed), recon}."""
    from medchain.data import partition

    defences = dict(DEFENCES if defences is None else defences)
    cfg = replace(cfg, seed=seed)
    insts = partition(dataset, None if partition_scheme == "sites" else institutions, partition_scheme, seed=seed)
    if update_mia_rounds is None:   # the first, a middle and the last round
        update_mia_rounds = sorted({0, cfg.rounds // 2, cfg.rounds - 1})
    shadow_rounds = update_mia_rounds if update_shadow_rounds is None else update_shadow_rounds
    util, runs = defence_runs(insts, dataset.n_classes, cfg, defences, chain=chain,
                              snapshot_rounds=tuple(sorted({*update_mia_rounds, *shadow_rounds})))
    idx = pick_images(dataset.train, n_attack_images, seed)
    with torch.random.fork_rng(devices=[]):
        leak, recon = protocol_leakage(dataset.train, dataset.n_classes, {k: r.model for k, r in runs.items()},
                                       cfg, defences, idx, steps=attack_steps, bn_prior=bn_prior,
                                       chain=attack_chain, seed=seed, keep_recon=keep_recon,
                                       dp_plans={k: r.institutions[0].dp_plan for k, r in runs.items()})
        if worst_case_thetas:
            leak += worst_case_leakage(dataset.train, dataset.n_classes, idx[:1], worst_case_thetas,
                                       steps=worst_case_steps, seed=seed)
    mia = membership_sweep(runs, insts, n=mia_n, lira_shadows=lira_shadows, cfg=cfg, seed=seed)
    kept = {k: _only_rounds(r, update_mia_rounds) for k, r in runs.items()}
    parts = [mia, update_membership(kept, insts, n=update_mia_n, seed=seed)]
    if update_shadows:
        with torch.random.fork_rng(devices=[]):
            parts.append(update_lira({k: _only_rounds(r, shadow_rounds) for k, r in runs.items()}, insts,
                                     dataset.n_classes, {k: _config(cfg, o) for k, o in defences.items()},
                                     n_shadow=update_shadows, n=update_mia_n, seed=seed))
    mia = pd.concat(parts, ignore_index=True)
    return {"seed": seed, "utility": pd.DataFrame(util).assign(seed=seed),
            "leak": pd.DataFrame(leak).assign(seed=seed), "mia": mia.assign(seed=seed), "recon": recon}
