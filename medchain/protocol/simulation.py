"""The in-process driver: :func:`run_collaborative` runs every institution of a task in this
process, on an embedded or external chain or on the chain-free :class:`MemoryLedger`."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from medchain.baselines import pooled_test
from medchain.blobstore import BlobStore, MemoryBlobStore
from medchain.data.types import ImageSet, InstitutionData
from medchain.params import Layout, digest_vector, load_flat, model_vector
from medchain.protocol.attestation import AttestationMismatchError, check_attestations
from medchain.protocol.config import CollabConfig, task_model
from medchain.protocol.institution import Institution
from medchain.protocol.memory_ledger import MemoryLedger
from medchain.protocol.policy import start_model, task_params
from medchain.training import evaluate


def _evaluated_vector(inst: Institution) -> np.ndarray:
    """The model scored each round: the global model, or under ``bn_stats="local"`` (no global
    BatchNorm statistics exist) the global weights with this institution's own statistics."""
    if inst.cfg.bn_stats == "local":
        return np.where(inst.local_mask, inst.local_vec, inst.global_vec).astype(np.float32)
    return inst.global_vec


@dataclass
class CollabResult:
    """Outcome of run_collaborative. history: one row per round (pooled-test metrics of the global
    model, its digest, wall time). timings: seconds summed over institutions by phase."""

    history: list[dict]
    model: nn.Module
    institutions: list[Institution]
    final_digest: bytes
    ledger_address: str
    chain_identity: str = ""
    final_block_hash: str = ""
    timings: dict = field(default_factory=dict)
    wall_s: float = 0.0


def run_collaborative(institutions: list[InstitutionData], n_classes: int, cfg: CollabConfig, *,
                      chain: str | None = "embedded", store: BlobStore | None = None,
                      eval_set: ImageSet | None = None, quiet: bool = True,
                      select_for: Callable[[int], Callable | None] | None = None,
                      round_callback: Callable[[int, list[Institution]], None] | None = None,
                      initial_model: nn.Module | None = None, dp_plans: dict | None = None) -> CollabResult:
    """Simulate collaborative training with every institution in this process.

    chain: "embedded" (in-process eth-tester chain), an ``http://`` node URL (anvil, geth, ...),
      an already connected ``Web3`` (e.g. a chain that also hosts a bridge), or None for the
      chain-free reference (:class:`MemoryLedger`). The task's parameters go on its ledger
      (:func:`~medchain.protocol.policy.task_params`); every institution follows them.
    store: the blob store of every institution (payloads above ``max_inline_bytes``; a bridged
      model's payload, when the policy starts from one, must be there unless inline).
    eval_set: where the global model is scored each round (default: all institutions' test splits).
    select_for: ``institution index -> select hook or None``: uploads that ignore the policy
      (Byzantine members in robustness tests; see :class:`Institution`).
    initial_model: initial weights handed to every institution (its own copy) instead of the model
      the policy prescribes (simulation only: e.g. personalization after a FedAvg run); the ledger
      records their digest.
    dp_plans: ``{institution index: DPPlan}`` handed to those institutions (simulation only: see
      :class:`Institution`'s ``dp_plan``).
    """
    t_start = time.perf_counter()
    store = store if store is not None else MemoryBlobStore()
    eval_set = eval_set if eval_set is not None else pooled_test(institutions)
    in_chans = institutions[0].train.n_channels
    w3 = None
    if chain is not None:
        from medchain.chain import chain_identity, connect, deploy_ledger, dev_accounts, final_block_hash
        w3 = connect(None if chain == "embedded" else chain) if isinstance(chain, str) else chain
    if initial_model is not None and cfg.bridged_model is not None:
        raise ValueError("the task starts from its bridged model (bridged_model); initial_model cannot apply")
    probe = initial_model if initial_model is not None else \
        start_model(cfg, in_chans, n_classes, w3=w3, store=store)[0]
    layout = Layout.from_module(probe)
    init_digest = digest_vector(model_vector(probe, layout), layout)
    if chain is None:
        admin = MemoryLedger(init_digest, cfg.rounds)
        clients = [admin.as_account(f"institution-{d.index}") for d in institutions]
        identity, block_hash = "memory", ""
    else:
        accounts = dev_accounts(w3, len(institutions) + 1)
        admin = deploy_ledger(w3, accounts[0], cfg.model, init_digest, cfg.rounds,
                              params=task_params(cfg, layout, n_classes, in_chans),
                              members=[a.address for a in accounts[1:]], start=True,
                              max_samples=cfg.max_samples if cfg.max_samples is not None else 2 ** 64 - 1)
        clients = [admin.as_account(a) for a in accounts[1:]]

    def make(d: InstitutionData, client) -> Institution:
        init = copy.deepcopy(initial_model).train() if initial_model is not None else None
        return Institution(d, n_classes, cfg, client, store, init_model=init,
                           select=select_for(d.index) if select_for is not None else None,
                           dp_plan=(dp_plans or {}).get(d.index))
    insts = [make(d, c) for d, c in zip(institutions, clients)]
    for inst in insts:   # every institution checks it starts from the model the task recorded
        if inst.global_digest() != init_digest:
            raise AttestationMismatchError(f"institution {inst.index} built an initial model whose digest "
                                           "differs from the task's initial-model digest")
    history = []
    for r in tqdm(range(cfg.rounds), desc="collaborative rounds", disable=quiet):
        t0 = time.perf_counter()
        for inst in insts:
            inst.upload(r, inst.train_round(r))
        digests = [inst.sync_round(r) for inst in insts]
        check_attestations(insts[0].ledger, r, digests[0], len(insts))
        model = insts[0].model
        load_flat(model, _evaluated_vector(insts[0]), insts[0].layout)
        history.append({"round": r + 1, "digest": digests[0].hex(), "round_s": time.perf_counter() - t0,
                        **evaluate(model, eval_set)})
        if round_callback is not None:
            round_callback(r, insts)
    final = task_model(cfg, institutions[0].train.n_channels, n_classes)
    load_flat(final, _evaluated_vector(insts[0]), insts[0].layout)
    timings = {k: sum(i.timings[k] for i in insts) for k in insts[0].timings}
    if chain is not None:
        identity, block_hash = chain_identity(w3, admin.address), final_block_hash(w3)
    return CollabResult(history, final, insts, digests[0], admin.address, identity, block_hash,
                        timings, time.perf_counter() - t_start)
