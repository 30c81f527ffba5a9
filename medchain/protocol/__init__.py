"""Collaborative training coordinated by a task ledger — no central server.

Each :class:`Institution` holds only its own private data. One round ``r``:

1. every institution starts from its copy of the global model ``w``, trains ``local_epochs`` on its
   own data, and forms its update ``Δ = w_local − w`` (all floating tensors, BatchNorm statistics
   included);
2. it selects what to share (``theta_u`` = 1: everything; see :mod:`medchain.privacy`), encodes it
   (:mod:`medchain.codec`) and submits digest + payload (inline, or the digest only with the payload
   in the blob store) to the ledger with its sample count;
3. once the round has closed, every institution *independently* reads the round's updates from the
   ledger in chain order, verifies each payload against its on-chain digest, decodes it strictly and
   aggregates deterministically (:mod:`medchain.aggregation`) into the next global model (deployed
   nodes first report which payloads they could not fetch and wait for the round's availability to
   be sealed on chain: an update a majority cannot fetch is left out by every replica);
4. each attests the digest of the global model it computed; in a simulation all attestations must
   agree, otherwise the run stops with :class:`AttestationMismatchError` naming the round (a
   deployed node goes on with a strict majority of the members behind its digest:
   :func:`check_attestations`).

The same :class:`Institution` code runs in one process (simulation, :func:`run_collaborative`) or one
process per hospital (deployment). :class:`MemoryLedger` is the chain-free FedAvg reference: same
code, same aggregation, an in-memory log instead of a chain — identical seeds give identical digests.
The ledger records come from :mod:`medchain.records`; :mod:`medchain.chain` is imported only inside
the chain paths, so the chain-free reference never loads web3 (tests/test_layers.py).

Modules: :mod:`~medchain.protocol.config` (the task's parameters), :mod:`~medchain.protocol.policy`
(the round policy recorded on chain, parsed strictly; the start it prescribes), :mod:`~medchain.protocol.institution`
(one hospital), :mod:`~medchain.protocol.memory_ledger` (the chain-free ledger),
:mod:`~medchain.protocol.attestation` (agreement of the replicas), :mod:`~medchain.protocol.simulation`
(the in-process driver).
"""
from medchain.protocol.attestation import Agreement, AttestationMismatchError, check_attestations
from medchain.protocol.config import KEEP_LOCAL, CollabConfig, scaffold_layout_id, task_model
from medchain.protocol.institution import Institution
from medchain.protocol.memory_ledger import MemoryLedger
from medchain.protocol.policy import (METADATA_KEYS, POLICY_SECTIONS, config_from_params, policy_sections,
                                      start_model, task_params)
from medchain.protocol.simulation import CollabResult, run_collaborative

__all__ = ["Agreement", "AttestationMismatchError", "CollabConfig", "CollabResult", "Institution", "KEEP_LOCAL",
           "METADATA_KEYS", "MemoryLedger", "POLICY_SECTIONS", "check_attestations", "config_from_params",
           "policy_sections", "run_collaborative", "scaffold_layout_id", "start_model", "task_model",
           "task_params"]
