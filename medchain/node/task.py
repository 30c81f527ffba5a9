"""Task set-up: the task parameters a ledger records (:func:`task_params`, :func:`config_from_task`),
deploying and starting a task (:func:`create_task`, ``medchain task create``), and one
institution's share of the data (:func:`load_institution`)."""
from __future__ import annotations

import logging

from medchain.chain import deploy_ledger
from medchain.chain.ledger import member_address
from medchain.data import load_dataset, partition
from medchain.params import Layout, digest_vector, model_vector
from medchain.protocol import CollabConfig, config_from_params, start_model, task_params

log = logging.getLogger("medchain.node")


class NodeError(RuntimeError):
    """A node cannot go on (not a member, wrong model, node unreachable for too long, ...)."""


def config_from_task(task) -> CollabConfig:
    """The :class:`CollabConfig` (the round policy) recorded in a ledger's ``task().params``, parsed
    strictly (:func:`medchain.protocol.config_from_params`: an unknown key is an error)."""
    params = dict(task.params)
    if "_unparsed" in params:
        raise NodeError(f"the task params of ledger {task.address} are not valid JSON; is this a "
                        "medchain task?")
    params.setdefault("rounds", int(task.n_rounds))
    try:
        cfg = config_from_params(params, where=f"ledger {task.address}")
    except (TypeError, ValueError) as exc:
        raise NodeError(str(exc)) from None
    if cfg.rounds != task.n_rounds:
        raise NodeError(f"ledger {task.address}: params say rounds={cfg.rounds} but the ledger has "
                        f"{task.n_rounds} rounds")
    return cfg


def create_task(w3, admin, cfg, members: list[str], *, n_classes: int, in_chans: int = 1,
                deadline_blocks: int = 0, quorum: int = 1, start: bool = True, store=None):
    """Deploy a TaskLedger for ``cfg`` (the initial model is the one its policy prescribes:
    :func:`medchain.protocol.start_model` — ``cfg.model`` drawn from ``cfg.seed``, or warm-started
    from the model the bridge on ``w3``'s chain accepted, payload from ``store`` unless inline),
    add ``members`` and start it. Returns the admin's LedgerClient.

    Everything is checked before the first transaction (no orphan contract on a bad argument):
    ``cfg`` (its own checks), member addresses (hex, EIP-55 checksum when mixed-case, no zero
    address, no repeats), quorum, deadline, classes, channels, and that the model builds. The
    ledger's cap on reported sample counts is ``cfg.max_samples`` (None: 2**64 − 1, logged as a
    warning with rule ``mean``, where one member could then outweigh all others)."""
    if not members:
        raise ValueError("a task needs at least one member address")
    members = [member_address(m) for m in members]
    dup = sorted({m for m in members if members.count(m) > 1})
    if dup:
        raise ValueError(f"member address(es) listed more than once: {', '.join(dup)}")
    if not 1 <= quorum <= len(members):
        raise ValueError(f"quorum must be between 1 and the number of members ({len(members)}), got {quorum}")
    if not 0 <= int(deadline_blocks) < 2 ** 64:
        raise ValueError(f"deadline_blocks must be >= 0 (0: no deadline), got {deadline_blocks}")
    if int(n_classes) < 2 or int(in_chans) < 1:
        raise ValueError(f"need at least 2 classes and 1 channel, got {n_classes} and {in_chans}")
    if cfg.max_samples is None and cfg.aggregation.split(":")[0] == "mean":
        log.warning("no max_samples cap: with rule 'mean' a member reporting a huge sample count would "
                    "outweigh all others; pass --max-samples (the largest member's training set size)")
    model = start_model(cfg, in_chans, n_classes, w3=w3, store=store)[0]
    layout = Layout.from_module(model)
    init = digest_vector(model_vector(model, layout), layout)
    return deploy_ledger(w3, admin, cfg.model, init, cfg.rounds,
                         params=task_params(cfg, layout, n_classes, in_chans),
                         deadline_blocks=deadline_blocks, quorum=quorum, members=list(members), start=start,
                         max_samples=cfg.max_samples if cfg.max_samples is not None else 2 ** 64 - 1)


def load_institution(source: str, scheme: str, institutions: int, index: int, *, alpha: float = 0.5,
                     fraction: float = 1.0, seed: int = 0):
    """Institution ``index``'s share of ``source`` split as the in-process simulation splits it
    (:func:`medchain.data.partition`). Returns ``(InstitutionData, n_classes, in_chans)``."""
    ds = load_dataset(source)
    insts = partition(ds, None if scheme == "sites" else institutions, scheme, alpha=alpha,
                      fraction=fraction, seed=seed)
    if not 0 <= index < len(insts):
        raise ValueError(f"--institution-index must be in [0, {len(insts)}), got {index}")
    return insts[index], ds.n_classes, ds.n_channels
