"""The chain-free ledger: :class:`MemoryLedger`, the TaskLedger's interface over an in-memory log
(records from :mod:`medchain.records`, so it never loads web3)."""
from __future__ import annotations

from medchain.records import Attestation, Update


class MemoryLedger:
    """The chain-free reference: the TaskLedger's interface over an in-memory log (one shared
    object — exactly what the chain replaces). Used for the FedAvg reference and its comparison."""

    address = "memory"

    def __init__(self, initial_digest: bytes, n_rounds: int):
        self.initial_digest = initial_digest
        self.n_rounds = n_rounds
        self._updates: dict[int, list[Update]] = {}
        self._attest: dict[int, list[Attestation]] = {}
        self._members: list[str] = []
        self._seq = 0

    def as_account(self, account: str) -> "MemoryLedger.Member":
        if account not in self._members:
            self._members.append(account)
        return MemoryLedger.Member(self, account)

    class Member:
        """What one institution sees: submit, read, attest."""

        def __init__(self, ledger: "MemoryLedger", account: str):
            self.ledger, self.account = ledger, account

        def submit_update(self, round, digest, n_values, n_samples, payload=b""):
            lst = self.ledger._updates.setdefault(round, [])
            if any(u.sender == self.account for u in lst):
                raise ValueError(f"{self.account} already submitted an update for round {round}")
            self.ledger._seq += 1
            lst.append(Update(round, self.account, bytes(digest), n_values, n_samples, bytes(payload),
                              self.ledger._seq, 0, ""))

        def updates(self, round):
            return list(self.ledger._updates.get(round, []))

        def attest(self, round, digest):
            lst = self.ledger._attest.setdefault(round, [])
            lst.append(Attestation(round, self.account, bytes(digest), bytes(digest) == lst[0].digest if lst else True))

        def attestations(self, round):
            return list(self.ledger._attest.get(round, []))
