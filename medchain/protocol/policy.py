"""The round policy a task records on chain, read back strictly, and the start it prescribes.

A task's parameters (``task().params`` on its ledger) are :class:`~medchain.protocol.CollabConfig`'s
fields plus the metadata keys :data:`METADATA_KEYS`; :func:`config_from_params` parses them back
and refuses any other key (a node must never run a policy it did not understand). Grouped by what
they decide (:func:`policy_sections`, printed by ``medchain ledger show``):

* ``upload`` — what leaves an institution: θu / rule / scope / γ / σ (partial update), θd,
  local-only coordinates (``keep_local``: FedPer, FedBN), the BatchNorm-statistics policy, payload
  limits;
* ``objective`` — local training: optimizer and schedule, FedProx μ, L2-SP β (anchor: the bridged
  model), SCAFFOLD, standardization, augmentation, DP-SGD (ε, δ, clip bound);
* ``init`` — the task's initial model: ``model`` drawn from ``seed`` (``init="fresh"``), or that
  model warm-started from a model accepted by the task chain's bridge (``init="warm_start"``,
  ``bridged_model``);
* ``merge`` — the aggregation rule, server learning rate and momentum, the sample-count cap.

:func:`start_model` builds what ``init`` and L2-SP prescribe: every institution (in-process or a
``medchain node`` process) resolves the bridged message on its own chain, verifies the payload
against the accepted digest (:func:`medchain.crosschain.receive`) and parses it over the source
model's layout.
"""
from __future__ import annotations

import re
from dataclasses import fields

import numpy as np
import torch
from torch import nn

from medchain.models import build_model, list_models
from medchain.params import Layout
from medchain.protocol.config import CollabConfig, task_model

#: Keys a task's parameters may hold besides CollabConfig's fields (written by the task's creator).
METADATA_KEYS: tuple[str, ...] = ("layout_id", "n_classes", "in_chans")

#: CollabConfig's fields grouped by what they decide (every field in exactly one group).
POLICY_SECTIONS: dict[str, tuple[str, ...]] = {
    "upload": ("theta_u", "select_rule", "select_scope", "gamma", "sigma", "theta_d", "keep_local",
               "bn_stats", "max_inline_bytes", "max_abs_update"),
    "objective": ("rounds", "local_epochs", "batch_size", "lr", "lr_floor", "optimizer", "weight_decay",
                  "prox_mu", "l2sp_beta", "scaffold", "standardize", "augment", "bn_recalibrate",
                  "dp_epsilon", "dp_delta", "dp_max_grad_norm"),
    "init": ("model", "seed", "init", "bridged_model"),
    "merge": ("aggregation", "server_lr", "server_momentum", "max_samples"),
}

#: The keys of CollabConfig.bridged_model.
BRIDGED_MODEL_KEYS: tuple[str, ...] = ("bridge", "message", "model", "in_chans", "n_classes")


def policy_sections(cfg: CollabConfig) -> dict[str, dict]:
    """``{section: {field: value}}`` of ``cfg`` (sections of :data:`POLICY_SECTIONS`)."""
    d = cfg.to_dict()
    return {sec: {k: d[k] for k in keys} for sec, keys in POLICY_SECTIONS.items()}


def task_params(cfg: CollabConfig, layout: Layout, n_classes: int, in_chans: int) -> dict:
    """What a task records on chain: the policy (CollabConfig's fields) and the metadata
    (:data:`METADATA_KEYS`: the model's layout id, classes and channels)."""
    return {**cfg.to_dict(), "layout_id": layout.layout_id_hex, "n_classes": int(n_classes),
            "in_chans": int(in_chans)}


def config_from_params(params: dict, *, where: str = "the task") -> CollabConfig:
    """The :class:`CollabConfig` recorded in a task's parameters, parsed strictly: a key that is
    neither a CollabConfig field nor in :data:`METADATA_KEYS` is an error naming it and the valid
    keys (fields missing from older tasks take their defaults)."""
    names = [f.name for f in fields(CollabConfig)]
    unknown = sorted(set(params) - set(names) - set(METADATA_KEYS))
    if unknown:
        raise ValueError(f"{where} records unknown parameter(s) {unknown}: this medchain version does not "
                         f"know how to run them. Valid keys: {sorted(names)} and metadata "
                         f"{list(METADATA_KEYS)} (a newer medchain wrote this task? upgrade)")
    return CollabConfig(**{k: v for k, v in params.items() if k in names})


def check_bridged_model(ref) -> dict:
    """``ref`` checked and normalized (message id lower-case hex); raises ValueError naming the
    problem. Keys exactly :data:`BRIDGED_MODEL_KEYS`."""
    if not isinstance(ref, dict):
        raise ValueError(f"task parameter bridged_model must be a dict with keys {list(BRIDGED_MODEL_KEYS)}, "
                         f"got {ref!r}")
    if set(ref) != set(BRIDGED_MODEL_KEYS):
        raise ValueError(f"task parameter bridged_model must have exactly the keys {list(BRIDGED_MODEL_KEYS)}, "
                         f"got {sorted(ref)}")
    bridge, message = str(ref["bridge"]), str(ref["message"])
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", bridge):
        raise ValueError(f"bridged_model.bridge must be the bridge contract's 0x address, got {bridge!r}")
    if not re.fullmatch(r"0x[0-9a-fA-F]{64}", message):
        raise ValueError(f"bridged_model.message must be the accepted message id (0x + 64 hex), got {message!r}")
    model = ref["model"]
    if not isinstance(model, str) or not (model in list_models() or model.startswith("timm:")):
        raise ValueError(f"bridged_model.model must be one of {list_models()} or 'timm:<name>', got {model!r}")
    for key, low in (("in_chans", 1), ("n_classes", 2)):
        v = ref[key]
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
            raise ValueError(f"bridged_model.{key} must be an integer >= {low}, got {v!r}")
    return {"bridge": bridge, "message": message.lower(), "model": model, "in_chans": int(ref["in_chans"]),
            "n_classes": int(ref["n_classes"])}


def bridged_vector(ref: dict, w3, store=None) -> tuple[np.ndarray, Layout]:
    """The source model of ``ref`` (:data:`BRIDGED_MODEL_KEYS`): its payload received from the
    bridge at ``ref["bridge"]`` on ``w3``'s chain (inline, or from ``store``), verified against the
    accepted digest, parsed over the source model's layout. Returns ``(vector float32 (P,), layout)``."""
    from medchain.chain import BridgeClient
    from medchain.crosschain import parse_model_payload, receive

    if w3 is None:
        raise ValueError("this task starts from a bridged model (bridged_model): it needs a chain ledger, "
                         "whose chain hosts the bridge — not the chain-free reference")
    layout = Layout.from_module(build_model(ref["model"], ref["in_chans"], ref["n_classes"], 0))
    payload = receive(BridgeClient(w3, ref["bridge"]), ref["message"], store)
    return parse_model_payload(payload, layout), layout


def start_model(cfg: CollabConfig, in_chans: int, n_classes: int, *, w3=None, store=None
                ) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The task's initial model and the L2-SP anchor (``{parameter name: source tensor}``, or None)
    that ``cfg`` prescribes. Without a bridged model: :func:`task_model`. With one (resolved on
    ``w3``'s chain, payload from ``store`` unless inline): ``cfg.model`` drawn from ``cfg.seed``,
    warm-started from it when ``init == "warm_start"`` (the head stays fresh,
    :func:`medchain.transfer.warm_start`), and its anchor when ``l2sp_beta > 0``."""
    if cfg.bridged_model is None:
        return task_model(cfg, in_chans, n_classes), None
    from medchain.transfer import l2sp_anchor, warm_start

    vec, layout = bridged_vector(cfg.bridged_model, w3, store)
    net = build_model(cfg.model, in_chans, n_classes, cfg.seed)
    if cfg.init == "warm_start":
        warm_start(net, vec, layout)
    anchor = l2sp_anchor(vec, layout, net) if cfg.l2sp_beta > 0 else None
    return net, anchor
