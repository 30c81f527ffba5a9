"""Plain records of a task ledger, shared by the chain client and the chain-free protocol.

:class:`Update`, :class:`Attestation`, :class:`RoundInfo` and :class:`TaskInfo` are what a ledger
returns — :class:`medchain.chain.LedgerClient` reads them from the chain,
:class:`medchain.protocol.MemoryLedger` keeps them in memory; :class:`MemberLedger` is the interface
both offer to one member (what :class:`medchain.protocol.Institution` uses). This module sits below both
``medchain.chain`` and ``medchain.protocol`` and imports only the standard library, so the chain-free
path never loads web3. ``medchain.chain.ledger`` re-exports every name, so existing imports work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["TaskInfo", "Update", "Attestation", "RoundInfo", "MemberLedger"]


@dataclass(frozen=True)
class TaskInfo:
    """Task metadata and state, as recorded by the ledger."""
    address: str
    admin: str
    model_arch: str
    initial_model_digest: bytes
    n_rounds: int
    params: dict
    params_json: str
    round_deadline_blocks: int
    quorum: int
    started: bool
    finished: bool
    current_round: int
    max_samples: int = 2 ** 64 - 1


@dataclass(frozen=True)
class Update:
    """One ``UpdateSubmitted`` event. ``payload`` is empty when it lives in the blob store.
    ``withdrawn``: its sender was removed before the round closed (and not re-added), so the update
    does not count; final once the round closed (closed rounds never change). ``unavailable``: the
    round's availability is sealed and a majority of the other reporting members could not fetch
    its payload, so every replica leaves it out (contracts/TaskLedger.sol, data availability)."""
    round: int
    sender: str
    digest: bytes
    n_values: int
    n_samples: int
    payload: bytes = field(repr=False)
    block_number: int
    log_index: int
    tx_hash: str
    withdrawn: bool = False
    unavailable: bool = False

    @property
    def payload_size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class Attestation:
    """A member's digest of the global model after a round; ``agrees`` compares it with the
    round's current majority digest."""
    round: int
    member: str
    digest: bytes
    agrees: bool


@dataclass(frozen=True)
class RoundInfo:
    """Open/close blocks (close 0 = still open; open 0 = not opened yet) and update count."""
    round: int
    open_block: int
    close_block: int
    submitted: int
    deadline_block: int
    n_attestations: int
    majority_digest: bytes | None
    mismatches: int


@runtime_checkable
class MemberLedger(Protocol):
    """A task ledger as one member sees it (a :class:`medchain.chain.LedgerClient` with the
    member's account, a :class:`medchain.protocol.MemoryLedger.Member`): submit this member's
    update of a round, read a round's updates in ledger order, attest a global digest, read a
    round's attestations."""

    def submit_update(self, round: int, digest: bytes, n_values: int, n_samples: int,
                      payload: bytes = b""): ...

    def updates(self, round: int) -> list[Update]: ...

    def attest(self, round: int, digest: bytes): ...

    def attestations(self, round: int) -> list[Attestation]: ...
