"""Claim 4: after collaborative training, personalized models per institution improve further.
Used by notebooks/04_personalization.ipynb.

On one non-IID setting (a partition of one data set among institutions) :func:`personalize_setting`
trains, with the same model, optimizer, batch size and seed:

* ``global`` — collaborative training on the chain (FedAvg), the model every institution shares;
* ``global_prior`` / ``global_uniform`` — the same model with the label-prior correction that
  matches plain ACC (local prior) / balanced ACC (uniform prior); no training;
* ``finetune_all`` / ``finetune_head`` — the global model fine-tuned locally, once per metric
  (started from that metric's correction, epoch selected on that validation metric);
* ``fedper`` / ``fedbn`` — collaborative runs on the chain in which the head / the BatchNorm layers
  never leave the institution (audited from the chain: :func:`medchain.personalize.audit_local_only`);
* ``local_only`` — each institution alone (epoch selected per metric); ``majority`` — the
  training majority class;

and scores every institution's model on that institution's own validation and test splits (with
``test_per_institution``: built from the pooled data, :mod:`medchain.data.pooled`, so each test set
is large enough to decide and follows its institution's label mix). The same decisions across a
sweep of heterogeneity: :mod:`medchain.experiments.personalization_sweep`. Tables, gains, verdicts,
per-seed runs and figures: :mod:`medchain.experiments.personalization_summary`.

Rows carry ``selected_on``: ``"acc"`` / ``"balanced_acc"`` for a model selected on that validation
metric, ``"none"`` for one that involves no selection. :func:`per_institution` reads each metric
from the model selected on it, so every table, gain and verdict here judges a method by the
metric it was selected on. Balanced ACC is NaN on a split with one class (``classes_in_test``).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from torch import nn

from medchain.data import Dataset, partition
from medchain.data.pooled import partition_pooled, split_report
from medchain.data.partition import SCHEMES as PARTITION_SCHEMES
from medchain.data.types import InstitutionData
from medchain.params import Layout, digest_vector, model_vector
from medchain.personalize import (METHODS, SELECT_METRICS, FinetuneConfig,
                                  LocalOnlyAudit, audit_local_only, finetune, fit_selecting,
                                  majority_metrics, personal_models, prior_corrected, run_local_mask,
                                  split_metrics, uniform_corrected)
from medchain.metrics import classification_metrics
from medchain.protocol import CollabConfig, CollabResult, run_collaborative
from medchain.models import build_model
from medchain.training import TrainConfig, predict_proba

#: Display order of methods and references.
ORDER = ("majority", "local_only", "global", "global_prior", "global_uniform") + METHODS
#: ``selected_on`` of a row whose model involves no validation selection.
NO_SELECTION = "none"
LABELS = {"majority": "majority class", "local_only": "local only", "global": "global (FedAvg)",
          "global_prior": "global + local-prior correction",
          "global_uniform": "global + uniform-prior correction", "finetune_all": "fine-tune (all layers)",
          "finetune_head": "fine-tune (head)", "fedper": "FedPer (head local)",
          "fedbn": "FedBN (BatchNorm local)"}
COLORS = {"finetune_all": "tab:blue", "finetune_head": "tab:cyan", "fedper": "tab:red",
          "fedbn": "tab:orange", "global_prior": "tab:gray", "global_uniform": "tab:gray"}


#: Partition schemes that take a Dirichlet alpha.
_DIRICHLET: tuple[str, ...] = tuple(s for s in PARTITION_SCHEMES if s.startswith("dirichlet"))


def parse_setting(setting: str) -> dict:
    """``"dirichlet:0.1"`` → {"scheme": "dirichlet", "alpha": 0.1}; ``"sites"``, ``"quantity"``,
    ``"iid"``, ``"quantity:1.5"`` (σ of the log-normal sizes) likewise (and
    ``"dirichlet_mix:<alpha>"`` where the partition module offers that scheme)."""
    scheme, _, arg = setting.partition(":")
    if scheme not in ("sites", "quantity", "iid") + _DIRICHLET:
        raise ValueError(f"unknown setting {setting!r}; use " + ", ".join(f"'{d}:<alpha>'" for d in _DIRICHLET)
                         + ", 'sites', 'quantity[:<sigma>]' or 'iid'")
    out: dict = {"scheme": scheme}
    if scheme in _DIRICHLET:
        out["alpha"] = float(arg) if arg else 0.5
    elif scheme == "quantity" and arg:
        out["quantity_sigma"] = float(arg)
    elif arg:
        raise ValueError(f"setting {setting!r}: {scheme!r} takes no argument")
    return out


@dataclass
class SettingRun:
    """Everything measured on one setting. rows: one per (method, selected_on, institution, split)
    with acc, balanced_acc (NaN on a one-class split), auc, loss, n, classes_in_test. runs: the
    chain runs (fedavg, fedper, fedbn). audits: the chain audits of the runs with local-only
    coordinates. info: best epochs, digests, label counts, absent classes, wall times."""

    setting: str
    institutions: list[InstitutionData]
    rows: list[dict]
    runs: dict[str, CollabResult]
    audits: dict[str, LocalOnlyAudit]
    info: dict = field(default_factory=dict)

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def _score(setting: str, method: str, models: list[nn.Module], insts: list[InstitutionData],
           selected_on: str = NO_SELECTION) -> list[dict]:
    rows = []
    for model, inst in zip(models, insts):
        for split in ("val", "test"):
            rows.append({"setting": setting, "method": method, "institution": inst.index, "split": split,
                         "selected_on": selected_on, **split_metrics(model, getattr(inst, split))})
    return rows


#: The global model counts as degenerate when its balanced ACC on all institutions' test splits
#: pooled is below chance (1/K) plus this margin: it then predicts (nearly) one class, and
#: per-institution means of any metric say more about the label skew than about personalization.
DEGENERATE_MARGIN = 0.05


def global_health(model: nn.Module, insts: list[InstitutionData], k: int) -> dict:
    """The global model on all institutions' test splits pooled: ACC, balanced ACC, how many
    images it assigns to each class (``predicted``; ``true`` for comparison) and ``degenerate``
    (balanced ACC < 1/K + :data:`DEGENERATE_MARGIN`). Note that a model that always predicts
    class c scores a mean per-institution balanced ACC below 1/K when c is absent from some
    institutions' test splits (0 there): that is the metric, not a bug."""
    labels = np.concatenate([i.test.labels for i in insts])
    proba = np.concatenate([predict_proba(model, i.test) for i in insts])
    m = classification_metrics(labels, proba)
    return {"acc": m["acc"], "balanced_acc": m["balanced_acc"],
            "predicted": np.bincount(proba.argmax(1), minlength=k).tolist(),
            "true": np.bincount(labels, minlength=k).tolist(),
            "degenerate": bool(not m["balanced_acc"] >= 1.0 / k + DEGENERATE_MARGIN)}


def _absent_classes(insts: list[InstitutionData], k: int, setting: str) -> dict:
    """Per institution, the classes its test split lacks; warns where balanced ACC is undefined."""
    absent = [[int(c) for c in np.flatnonzero(np.bincount(i.test.labels, minlength=k) == 0)] for i in insts]
    one = [i.index for i, a in zip(insts, absent) if k - len(a) < 2]
    if one:
        warnings.warn(f"setting {setting}: the test split of institution(s) {one} holds one class; "
                      "their balanced ACC is not computed (NaN) and means are over the others",
                      stacklevel=3)
    return {"test_classes_absent": absent, "test_one_class": one}


def _digests(models: list[nn.Module]) -> list[str]:
    out = []
    for m in models:
        layout = Layout.from_module(m)
        out.append(digest_vector(model_vector(m, layout), layout).hex())
    return out


def personalize_setting(dataset: Dataset, setting: str, cfg: CollabConfig, *, institutions: int = 5,
                        ft_all: FinetuneConfig | None = None, ft_head: FinetuneConfig | None = None,
                        local_epochs: int | None = None, methods=METHODS, chain: str | None = "embedded",
                        prior_smoothing: float = 1.0, local_mask_from: str = "global",
                        personal_rounds: int | None = None, personal_lr: float | None = None,
                        test_per_institution: int | None = None, quiet: bool = True) -> SettingRun:
    """Partition `dataset` by `setting` (see :func:`parse_setting`), train the global model, the
    personalization `methods` and the references, score each institution's model on its own
    val and test splits.

    test_per_institution: None — every institution's train / val / test is its share of the
      data set's official splits (:func:`medchain.data.partition`); an int — the official splits
      are pooled, partitioned by `setting`, and every institution's share split (stratified) into
      its own test set of that many images where its share allows, val and train
      (:func:`medchain.data.pooled.partition_pooled`; sizes in ``info``, see
      :func:`medchain.data.pooled.split_report`).
    ft_all / ft_head: fine-tuning configs; their ``select`` is overridden — each method is
    fine-tuned once per metric in :data:`medchain.personalize.SELECT_METRICS` (twice the cost),
    from that metric's correction when ``from_prior``.
    local_epochs: epochs of the local-only baseline (default rounds × local_epochs, the same
      passes over the data as the collaborative run).
    local_mask_from: how FedPer / FedBN run. ``"global"``: after collaborative training —
      `personal_rounds` (default max(2, rounds // 3)) more rounds on the chain from the final
      FedAvg model at `personal_lr` (default lr / 4), the local coordinates never uploaded from
      then on. ``"scratch"``: the whole collaborative training (cfg) with the local coordinates
      never uploaded (FedPer / FedBN as published).
    """
    if local_mask_from not in ("global", "scratch"):
        raise ValueError(f"local_mask_from must be 'global' or 'scratch', got {local_mask_from!r}")
    spec = parse_setting(setting)
    scheme = spec.pop("scheme")
    n_inst = None if scheme == "sites" else institutions
    if test_per_institution is None:
        insts = partition(dataset, n_inst, scheme, seed=cfg.seed, **spec)
    else:
        insts = partition_pooled(dataset, n_inst, scheme, test_per_institution=test_per_institution,
                                 seed=cfg.seed, **spec)
    k = dataset.n_classes
    ft_all = ft_all or FinetuneConfig(epochs=3, lr=1e-3, from_prior=True, seed=cfg.seed, batch_size=cfg.batch_size)
    ft_head = ft_head or FinetuneConfig(epochs=5, lr=5e-3, head_only=True, from_prior=True, seed=cfg.seed,
                                        batch_size=cfg.batch_size)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    rows, runs, audits, wall, cpu = [], {}, {}, {}, {}
    info: dict = split_report(insts, dataset.n_classes, test_per_institution)
    if isinstance(chain, str) and chain.strip().lower() == "embedded":
        from medchain.chain import connect     # one in-process chain per setting, one ledger per run
        chain = connect(None)
    info["train_label_counts"] = [np.bincount(i.train.labels, minlength=k).tolist() for i in insts]
    info.update(_absent_classes(insts, k, setting))

    # references that need no training
    for inst in insts:
        for split in ("val", "test"):
            rows.append({"setting": setting, "method": "majority", "institution": inst.index, "split": split,
                         "selected_on": NO_SELECTION,
                         **majority_metrics(inst.train.labels, getattr(inst, split).labels, k)})

    # the global model: collaborative training on the chain
    t0, c0 = time.perf_counter(), time.process_time()
    fedavg = run_collaborative(insts, k, cfg, chain=chain, quiet=quiet)
    runs["fedavg"] = fedavg
    wall["fedavg"], cpu["fedavg"] = time.perf_counter() - t0, time.process_time() - c0
    glob = fedavg.model.eval()
    rows += _score(setting, "global", [glob] * len(insts), insts)
    info["global_pooled_test"] = global_health(glob, insts, k)
    pooled_train = np.concatenate([i.train.labels for i in insts])
    corrected = [prior_corrected(glob, i.train.labels, pooled_train, k, smoothing=prior_smoothing) for i in insts]
    rows += _score(setting, "global_prior", corrected, insts)
    uniform = uniform_corrected(glob, pooled_train, k, smoothing=prior_smoothing)
    rows += _score(setting, "global_uniform", [uniform] * len(insts), insts)
    info["prior_shift"] = [c.shift.tolist() for c in corrected]
    info["uniform_shift"] = uniform.shift.tolist()
    shifts = {"acc": [c.shift.double().numpy() for c in corrected],
              "balanced_acc": [uniform.shift.double().numpy()] * len(insts)}

    # (a) local fine-tuning of the global model, once per metric: started from that metric's
    # correction (when from_prior) and its epoch selected on that validation metric
    for method, fcfg in (("finetune_all", ft_all), ("finetune_head", ft_head)):
        if method not in methods:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        info[f"{method}_best_epoch"], info[f"{method}_digests"] = {}, {}
        for metric in SELECT_METRICS:
            mcfg = replace(fcfg, select=metric)
            tuned = [finetune(glob, inst, mcfg, quiet=quiet, shift=sh) for inst, sh in zip(insts, shifts[metric])]
            rows += _score(setting, method, [t.model for t in tuned], insts, selected_on=metric)
            info[f"{method}_best_epoch"][metric] = [t.best_epoch for t in tuned]
            info[f"{method}_digests"][metric] = _digests([t.model for t in tuned])
        wall[method], cpu[method] = time.perf_counter() - t0, time.process_time() - c0

    # (b) FedPer and (c) FedBN: local-only coordinates during collaborative training
    if local_mask_from == "global":
        pcfg = replace(cfg, rounds=personal_rounds or max(2, cfg.rounds // 3), lr=personal_lr or cfg.lr / 4)
        start = glob
    else:
        pcfg, start = cfg, None
    info["local_mask_cfg"] = {"from": local_mask_from, **pcfg.to_dict()}
    for method in ("fedper", "fedbn"):
        if method not in methods:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        result, mask = run_local_mask(insts, k, pcfg, method, chain=chain, quiet=quiet, initial_model=start)
        wall[method], cpu[method] = time.perf_counter() - t0, time.process_time() - c0
        runs[method] = result
        audits[method] = audit_local_only(result, mask, initial_model=start)
        models = personal_models(result)
        rows += _score(setting, method, models, insts)
        info[f"{method}_digests"] = _digests(models)

    # local-only reference: one training per institution, the epoch selected per metric
    t0, c0 = time.perf_counter(), time.process_time()
    tcfg = TrainConfig(epochs=local_epochs or cfg.rounds * cfg.local_epochs, batch_size=cfg.batch_size,
                       lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
                       lr_floor=cfg.lr_floor, seed=cfg.seed)
    loc: dict[str, list[nn.Module]] = {metric: [] for metric in SELECT_METRICS}
    info["local_only_best_epoch"] = {metric: [] for metric in SELECT_METRICS}
    for inst in insts:   # as medchain.baselines.local_only, without scoring every epoch on pooled test
        m = build_model(cfg.model, inst.train.n_channels, k, cfg.seed)
        sel = fit_selecting(m, inst.train, inst.val, tcfg, SELECT_METRICS, quiet=quiet, desc=f"local {inst.index}")
        for metric in SELECT_METRICS:
            loc[metric].append(sel.load(m, metric))
            info["local_only_best_epoch"][metric].append(sel.best[metric][0])
    wall["local_only"], cpu["local_only"] = time.perf_counter() - t0, time.process_time() - c0
    for metric in SELECT_METRICS:
        rows += _score(setting, "local_only", loc[metric], insts, selected_on=metric)
    info["wall_s"], info["cpu_s"] = wall, cpu
    info["run_digests"] = {name: r.final_digest.hex() for name, r in runs.items()}
    return SettingRun(setting, insts, rows, runs, audits, info)
