"""Collaborative methods for sites that differ by scanner (claim 1 under feature shift), each a
set of task parameters (:class:`medchain.protocol.CollabConfig` fields, recorded on chain, so a
node runs it the same way), and how one of them is run, selected and scored for
:mod:`medchain.experiments.collaborative`.

Every method trains the same rounds × local epochs (equal passes over the data) and keeps the round
whose model(s) score best on the pooled validation splits (:func:`medchain.training.selection_key`);
a method with local-only coordinates (FedBN) is scored with each institution's own model on its
own images — validation for selection, test for the score.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from medchain.blobstore import fetch_payload
from medchain.data.types import ImageSet, InstitutionData
from medchain.harmonize import DEFAULT_AUGMENT
from medchain.metrics import classification_metrics, expected_calibration_error
from medchain.params import load_flat
from medchain.protocol import CollabConfig, CollabResult, run_collaborative
from medchain.training import predict_proba, recalibrate_bn, selection_key

__all__ = ["METHODS", "METHOD_HELP", "method_config", "MethodRun", "run_method", "site_scores",
           "bn_distance", "chain_cost", "label"]

#: Each method's task parameters on top of the notebook's base recipe (Adam, cosine lr, ...).
METHODS: dict[str, dict] = {
    "fedavg": {},
    "fedprox": {"prox_mu": 0.1},
    "fedavgm": {"server_momentum": 0.5, "server_lr": 0.5},
    "scaffold": {"scaffold": True, "optimizer": "sgd", "lr": 0.05},
    "fedbn": {"keep_local": "fedbn"},
    "harmonize": {"standardize": True, "augment": DEFAULT_AUGMENT},
    "fedbn_harmonize": {"keep_local": "fedbn", "standardize": True, "augment": DEFAULT_AUGMENT},
}
METHOD_HELP: dict[str, str] = {
    "fedavg": "the base recipe as given (FedAvg unless the base sets prox_mu / server_momentum)",
    "fedprox": "FedProx, proximal term mu = 0.1 (reference)",
    "fedavgm": "FedAvgM, server momentum 0.5 at server lr 0.5 (steady-state step = FedAvg's; reference)",
    "scaffold": "SCAFFOLD option II, SGD momentum 0.9 at lr 0.05; (dw, dc) on chain: twice the upload",
    "fedbn": "FedBN: every BatchNorm weight and statistic stays at its site; each site scored with its own",
    "harmonize": "per-image standardization + scanner augmentation from the ranges in the task parameters",
    "fedbn_harmonize": "FedBN and harmonization together",
}


def label(method: str) -> str:
    """The name a method's rows and summary entries carry: ``collaborative[<method>]``."""
    return f"collaborative[{method}]"


def method_config(cfg: CollabConfig, method: str, lr_scale: float = 1.0) -> CollabConfig:
    """`cfg` with `method`'s task parameters (a new, validated CollabConfig), its learning rate
    (the method's own, e.g. SCAFFOLD's SGD rate, or the recipe's) multiplied by `lr_scale`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if not (isinstance(lr_scale, (int, float)) and 0 < lr_scale < float("inf")):
        raise ValueError(f"lr_scale must be a positive number (a factor of the learning rate), got {lr_scale!r}")
    out = replace(cfg, **copy.deepcopy(METHODS[method]))
    return replace(out, lr=out.lr * float(lr_scale)) if lr_scale != 1.0 else out


def _metrics(labels: np.ndarray, proba: np.ndarray) -> dict:
    """classification_metrics plus the expected calibration error (``ece``) of the predictions."""
    return {**classification_metrics(labels, proba), "ece": expected_calibration_error(labels, proba)}


def _pooled_scores(models: list[nn.Module], sets: list[ImageSet]) -> tuple[dict, list[dict], np.ndarray]:
    """Each models[i] on sets[i]: (metrics of all predictions pooled, per-set metrics, pooled
    probabilities (N, K) in set order)."""
    probas = [predict_proba(m, s) for m, s in zip(models, sets)]
    labels = np.concatenate([s.labels for s in sets])
    proba = np.concatenate(probas)
    return _metrics(labels, proba), [_metrics(s.labels, p) for s, p in zip(sets, probas)], proba


class BestRound:
    """round_callback of :func:`medchain.protocol.run_collaborative`: scores each round's model(s)
    (the global model, or each institution's personal model when coordinates stay local) on the
    pooled validation splits, keeps the best round's vectors, and records the pooled test ACC per
    round for the learning curve only (it never influences the selection)."""

    def __init__(self, data: list[InstitutionData]):
        self.data, self.key, self.round, self.vectors, self.val = data, None, 0, None, None
        self.history: list[dict] = []

    def __call__(self, r: int, insts) -> None:
        personal = insts[0].local_mask is not None
        models = [copy.deepcopy(i.personal_model()) for i in insts] if personal else [insts[0].model] * len(insts)
        val, _, _ = _pooled_scores(models, [d.val for d in self.data])
        test, _, _ = _pooled_scores(models, [d.test for d in self.data])
        self.history.append({"round": r + 1, "val_acc": val["acc"], "acc": test["acc"]})
        key = selection_key(val)
        if self.key is None or key > self.key:
            self.key, self.round, self.val = key, r + 1, val
            self.vectors = [i.working_vector().copy() for i in insts] if personal else [insts[0].global_vec.copy()]

    def models(self, result: CollabResult) -> list[nn.Module]:
        """The selected round's model for each institution (one shared copy when nothing is local)."""
        out = []
        for vec in self.vectors:
            m = copy.deepcopy(result.model)
            load_flat(m, vec, result.institutions[0].layout)
            out.append(m.eval())
        return out * len(self.data) if len(out) == 1 else out


@torch.no_grad()
def bn_distance(model: nn.Module, images: ImageSet) -> float | None:
    """How far `images`' feature statistics lie from the model's BatchNorm running statistics:
    per BatchNorm channel the symmetric KL divergence between N(mean, var) of the layer's input
    over `images` and N(running_mean, running_var), averaged over channels and layers (0: the
    model normalizes these images exactly as it was calibrated). None without BatchNorm."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return None
    probe = copy.deepcopy(model)
    recalibrate_bn(probe, images)
    site = [m for m in probe.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    per_layer = []
    for a, b in zip(bns, site):
        m1, v1 = a.running_mean.double(), a.running_var.double().clamp_min(1e-8)
        m2, v2 = b.running_mean.double(), b.running_var.double().clamp_min(1e-8)
        kl = 0.5 * (v1 / v2 + v2 / v1 - 2) + 0.5 * (m1 - m2) ** 2 * (1 / v1 + 1 / v2)
        per_layer.append(float(kl.mean()))
    return float(np.mean(per_layer))


def site_scores(method: str, models: list[nn.Module], data: list[InstitutionData]) -> tuple[list[dict], np.ndarray]:
    """Tidy rows of models[i] scored on institution i's test split (eval_on ``inst<i>``, with the
    loss and the BatchNorm statistics distance on its validation images as diagnostics) and of all
    those predictions pooled (eval_on ``pooled``); and the pooled predicted classes (N,). Rows
    carry the test loss and expected calibration error (``ece``) beside ACC, balanced ACC, AUC."""
    pooled, per_site, proba = _pooled_scores(models, [d.test for d in data])
    shared = all(m is models[0] for m in models)
    rows = [{"method": method, "model_of": -1, "eval_on": "pooled", **pooled}]
    for d, m, s in zip(data, models, per_site):
        rows.append({"method": method, "model_of": -1 if shared else d.index, "eval_on": f"inst{d.index}", **s,
                     "bn_distance": bn_distance(m, d.val)})
    return rows, proba.argmax(1)


def chain_cost(result: CollabResult) -> dict:
    """What the run put on the ledger, read back from it: mean bytes of update payloads per round
    (inline or in the blob store; every institution's), values per update, and the gas of the
    update transactions per round (None on the chain-free ledger). Attestations cost the same for
    every method and are not counted."""
    inst = result.institutions[0]
    ledger, store = inst.ledger, inst.store
    w3 = getattr(ledger, "w3", None)
    nbytes, gas, values, inline = [], [], [], 0
    for r in range(len(result.history)):
        recs = ledger.updates(r)
        nbytes.append(sum(len(fetch_payload(u.digest, u.payload, store)) for u in recs))
        values += [int(u.n_values) for u in recs]
        inline += sum(1 for u in recs if len(u.payload))
        if w3 is not None:
            gas.append(sum(int(w3.eth.get_transaction_receipt(u.tx_hash)["gasUsed"]) for u in recs))
    return {"upload_bytes_per_round": float(np.mean(nbytes)),
            "values_per_update": float(np.mean(values)),
            "update_gas_per_round": float(np.mean(gas)) if gas else None,
            "inline_payloads": inline, "payloads": len(values)}


@dataclass
class MethodRun:
    """One method on one partition and seed: its selected models' rows (``label(method)``), the
    last round's rows, validation metrics of the selected round, per-round curve, chain cost."""

    method: str
    result: CollabResult
    rows: list[dict]
    last_rows: list[dict]
    val: dict
    round: int
    predicted: np.ndarray            # pooled test predictions of the selected round (N,)
    curve: list[dict] = field(default_factory=list)
    cost: dict = field(default_factory=dict)


def run_method(method: str, data: list[InstitutionData], n_classes: int, cfg: CollabConfig, *,
               chain: str | None = "embedded", quiet: bool = True, lr_scale: float = 1.0) -> MethodRun:
    """Run `method` (:data:`METHODS`) collaboratively with `cfg` as the base recipe (learning rate
    × `lr_scale`); select the round on validation; score the selected and the last round's models
    on test."""
    mcfg = method_config(cfg, method, lr_scale)
    best = BestRound(data)
    res = run_collaborative(data, n_classes, mcfg, chain=chain, quiet=quiet, round_callback=best)
    rows, predicted = site_scores(label(method), best.models(res), data)
    personal = res.institutions[0].local_mask is not None
    last = [copy.deepcopy(i.personal_model()).eval() for i in res.institutions] if personal else [res.model] * len(data)
    last_rows, _ = site_scores(label(method), last, data)
    return MethodRun(method, res, rows, last_rows, best.val, best.round, predicted, best.history, chain_cost(res))
