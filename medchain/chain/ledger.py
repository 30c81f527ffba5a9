"""Typed client of the TaskLedger contract (contracts/TaskLedger.sol).

One ledger = one collaborative task on one chain. The admin deploys it
(:func:`deploy_ledger`), adds members, and starts it; members submit one update per round
(:meth:`LedgerClient.submit_update`), read a round's updates back in chain order
(:meth:`LedgerClient.updates`) and attest the digest of the global model they computed
(:meth:`LedgerClient.attest`). The rules are in contracts/README.md.

Reading a round's updates queries ``eth_getLogs`` over the bounded block range
``[roundOpenBlock(r), roundCloseBlock(r) or latest]`` only: a whole-chain log query on the embedded
chain grows roughly quadratically with the chain length.

Example::

    from medchain.chain import connect, embedded_accounts, deploy_ledger, LedgerClient
    w3 = connect()                       # embedded chain
    admin, a, b = embedded_accounts(w3)[:3]
    ledger = deploy_ledger(w3, admin, "cnn-small", initial_digest, n_rounds=3, params={"theta_u": 0.1})
    ledger.add_member(a.address); ledger.add_member(b.address); ledger.start()
    LedgerClient(w3, ledger.address, a).submit_update(0, digest, n_values, n_samples, payload)
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from medchain.records import Attestation, MemberLedger, RoundInfo, TaskInfo, Update  # re-exported (records live below chain)

from .contract import ContractClient, digest32, uint
from .errors import ERRORS, LedgerTimeout

__all__ = ["TaskInfo", "Update", "Attestation", "RoundInfo", "MemberLedger", "LedgerClient", "deploy_ledger",
           "canonical_params", "CONTRACT_NAME"]

CONTRACT_NAME = "TaskLedger"

# Closing a round inside submitUpdate writes the close block, the next round's open block and the
# round counter. When members submit concurrently, an update estimated as an ordinary one can be
# mined as the one that closes the round: this headroom covers that path (measured: +12,631 gas,
# with new storage slots up to ~3 × 22,100).
ROUND_CLOSE_GAS = 70_000


def canonical_params(params: Mapping[str, Any]) -> str:
    """The canonical JSON text of task ``params`` (sorted keys, no spaces, UTF-8)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class LedgerClient(ContractClient):
    """Client of a deployed TaskLedger at ``address``, acting as ``account`` (None: read-only).

    Transactions are simulated first, so a refused call raises a :class:`LedgerError` subclass
    (``NotAMember``, ``AlreadySubmitted``, ``RoundClosed``, ``FutureRound``, ``NotStarted``,
    ``TaskFinished``, ``NotAdmin``, ...) and changes nothing on chain.
    """

    CONTRACT_NAME = CONTRACT_NAME
    ERRORS = ERRORS

    # ------------------------------------------------------------------ admin
    def add_member(self, member: str):
        """Admin only: make ``member`` an active member. Returns the receipt."""
        return self._transact("addMember", to_checksum_address(member))

    def remove_member(self, member: str):
        """Admin only: remove ``member`` (closes the current round if all remaining members submitted)."""
        return self._transact("removeMember", to_checksum_address(member))

    def start(self):
        """Admin only: open round 0."""
        return self._transact("start")

    # ------------------------------------------------------------------ members
    def submit_update(self, round: int, digest: bytes | str, n_values: int, n_samples: int,
                      payload: bytes = b"", *, gas: int | None = None, wait: bool = True):
        """Submit this member's update for ``round``: its sha256 ``digest``, the number of values
        and of training samples, and the encoded ``payload`` (empty: it lives in the blob store under
        ``digest``). Returns the receipt (the round closes in it if this was the last member), or
        the transaction hash with ``wait=False``. ``gas``: an explicit limit (skips the simulation,
        so a refused update is mined, reverts and then raises)."""
        return self._transact("submitUpdate", uint(round, 32, "round"), digest32(digest),
                              uint(n_values, 32, "n_values"), uint(n_samples, 64, "n_samples"),
                              bytes(payload), gas=gas, wait=wait, gas_headroom=ROUND_CLOSE_GAS)

    def close_round(self):
        """Close the current round after its deadline (anyone; needs ``quorum`` updates)."""
        return self._transact("closeRound")

    def attest(self, round: int, digest: bytes | str):
        """Record this member's digest of the global model after aggregating ``round`` (closed)."""
        return self._transact("attest", uint(round, 32, "round"), digest32(digest, "global digest"))

    def report_availability(self, round: int, missing: Sequence[str] = ()):
        """After ``round`` closed: report the senders of ``round`` whose payload this member could
        not fetch and verify (empty: everything available). Once per member and round; the report
        that makes one per active member seals the round's availability. Returns the receipt."""
        senders = sorted({to_checksum_address(m) for m in missing}, key=lambda a: int(a, 16))
        return self._transact("reportAvailability", uint(round, 32, "round"), senders)

    def seal_availability(self, round: int):
        """Seal ``round``'s availability once every member reported, or after the deadline with the
        quorum (anyone may call it)."""
        return self._transact("sealAvailability", uint(round, 32, "round"))

    # ------------------------------------------------------------------ views
    def availability(self, round: int) -> tuple[int, int]:
        """``(reports, seal block)`` of ``round``'s data availability (seal block 0: not sealed)."""
        reports, seal = self._call("availability", uint(round, 32, "round"))
        return reports, seal

    def has_reported_availability(self, round: int, member: str) -> bool:
        return self._call("reportedAvailability", uint(round, 32, "round"), to_checksum_address(member))[0]

    def is_unavailable(self, round: int, sender: str) -> bool:
        """Whether ``sender``'s update to ``round`` is excluded as unavailable (False until sealed)."""
        return self._call("isUnavailable", uint(round, 32, "round"), to_checksum_address(sender))[0]

    def task(self) -> TaskInfo:
        (admin, arch, init, n_rounds, params, deadline, quorum, started, finished,
         cur) = self._call("task")
        try:
            decoded = json.loads(params) if params else {}
        except json.JSONDecodeError:
            decoded = {"_unparsed": params}
        return TaskInfo(self.address, to_checksum_address(admin), arch, bytes(init), n_rounds, decoded,
                        params, deadline, quorum, started, finished, cur, self._call("maxSamples")[0])

    def max_samples(self) -> int:
        """The cap on an update's ``n_samples`` fixed at deployment (updates need 1 <= n <= cap)."""
        return self._call("maxSamples")[0]

    def withdrawn(self, round: int, member: str) -> bool:
        """Whether ``member``'s update to ``round`` was withdrawn by its removal before the round
        closed (final once the round closed)."""
        return self._call("withdrawn", uint(round, 32, "round"), to_checksum_address(member))[0]

    def current_round(self) -> int:
        """The open round; after the last round closed it equals ``n_rounds`` (all rounds closed)."""
        return self._call("currentRound")[0]

    def started(self) -> bool:
        return self._call("started")[0]

    def finished(self) -> bool:
        return self._call("finished")[0]

    def members(self) -> list[str]:
        return [to_checksum_address(a) for a in self._call("members")[0]]

    def is_member(self, account: str) -> bool:
        return self._call("isMember", to_checksum_address(account))[0]

    def admin(self) -> str:
        return to_checksum_address(self._call("admin")[0])

    def round_open_block(self, round: int) -> int:
        """Block in which ``round`` opened (0: not opened yet)."""
        return self._call("roundOpenBlock", round)[0]

    def round_close_block(self, round: int) -> int:
        """Block in which ``round`` closed (0: not closed yet)."""
        return self._call("roundCloseBlock", round)[0]

    def round_deadline_block(self, round: int) -> int:
        """Block after which ``close_round()`` may close ``round`` (0: no deadline / not open)."""
        return self._call("roundDeadlineBlock", round)[0]

    def submitted_count(self, round: int) -> int:
        return self._call("submittedCount", round)[0]

    def has_submitted(self, round: int, member: str) -> bool:
        return self._call("hasSubmitted", round, to_checksum_address(member))[0]

    def majority_digest(self, round: int) -> bytes | None:
        """The leading attested global digest of ``round`` (None: no attestation yet)."""
        digest, count = self._call("majorityDigest", round)
        return bytes(digest) if count else None

    def mismatch_count(self, round: int) -> int:
        """Attestations of ``round`` that disagreed with the majority when they were made."""
        return self._call("mismatchCount", round)[0]

    def attestations(self, round: int) -> list[Attestation]:
        """Attestations of ``round`` in the order they were recorded."""
        members, digests = self._call("attestations", round)
        maj = self.majority_digest(round)
        return [Attestation(round, to_checksum_address(m), bytes(d), bytes(d) == maj)
                for m, d in zip(members, digests)]

    def round_info(self, round: int) -> RoundInfo:
        maj, count = self._call("majorityDigest", round)
        members, _ = self._call("attestations", round)
        return RoundInfo(round, self.round_open_block(round), self.round_close_block(round),
                         self.submitted_count(round), self.round_deadline_block(round), len(members),
                         bytes(maj) if count else None, self.mismatch_count(round))

    def updates(self, round: int) -> list[Update]:
        """The updates submitted to ``round``, in chain order (block number, log index).

        Reads ``UpdateSubmitted`` logs of this ledger over ``[roundOpenBlock(r), roundCloseBlock(r)]``
        (or up to the latest block while the round is open). Empty if the round never opened.
        Each update says whether it was ``withdrawn`` (its sender removed before the round closed)
        and whether it is ``unavailable`` (excluded by the round's sealed availability reports).
        """
        open_block = self.round_open_block(round)
        if open_block == 0:
            return []
        close_block = self.round_close_block(round) or self.block_number()
        ev = self._abi.events["UpdateSubmitted"]
        logs = self._logs("UpdateSubmitted", open_block, close_block,
                          ["0x" + abi_encode(["uint32"], [round]).hex()])
        out = []
        withdrawn: dict[str, bool] = {}
        sealed = bool(logs) and self.availability(round)[1] != 0
        # withdrawn[r][m] is set only by removeMember(m) while round r is open: the contract is asked
        # about the senders removed within the round's blocks, one log query instead of a call each
        removed = {to_checksum_address(abi_decode(["address"], bytes(lg["topics"][1]))[0])
                   for lg in self._logs("MemberRemoved", open_block, close_block)} if logs else set()
        unavailable: dict[str, bool] = {}
        data_types = [t for _, t in ev["data"]]
        for lg in logs:
            topics = lg["topics"]
            (r,) = abi_decode(["uint32"], bytes(topics[1]))
            (sender,) = abi_decode(["address"], bytes(topics[2]))
            digest, n_values, n_samples, payload = abi_decode(data_types, bytes(lg["data"]))
            sender = to_checksum_address(sender)
            if sender not in withdrawn:
                withdrawn[sender] = sender in removed and self.withdrawn(round, sender)
                unavailable[sender] = sealed and self.is_unavailable(round, sender)
            out.append(Update(r, sender, bytes(digest), n_values, n_samples,
                              bytes(payload), lg["blockNumber"], lg["logIndex"],
                              "0x" + bytes(lg["transactionHash"]).hex(), withdrawn[sender],
                              unavailable[sender]))
        out.sort(key=lambda u: (u.block_number, u.log_index))
        return out

    def rounds(self) -> list[RoundInfo]:
        """Information on every round that opened so far."""
        t = self.task()
        if not t.started:
            return []
        last = min(t.current_round, t.n_rounds - 1)
        return [self.round_info(r) for r in range(last + 1)]

    def wait_round_closed(self, round: int, *, timeout: float = 600.0, poll_interval: float = 0.5) -> int:
        """Poll until ``round`` is closed; return its close block. Usable from any process that
        knows the ledger address. Raises ``LedgerTimeout`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            closed = self.round_close_block(round)
            if closed:
                return closed
            if time.monotonic() >= deadline:
                cur = self.current_round()
                raise LedgerTimeout(
                    f"round {round} of ledger {self.address} on {self._label} did not close within "
                    f"{timeout:.0f} s (current round {cur}, {self.submitted_count(round)} update(s) of "
                    f"{len(self.members())} member(s)); a member may have stopped, or close_round() "
                    "is needed after the deadline")
            time.sleep(poll_interval)

    def wait_round_open(self, round: int, *, timeout: float = 600.0, poll_interval: float = 0.5) -> int:
        """Poll until ``round`` has opened (the task started and earlier rounds closed); return its
        open block. Raises ``LedgerTimeout`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            opened = self.round_open_block(round)
            if opened:
                return opened
            if time.monotonic() >= deadline:
                raise LedgerTimeout(f"round {round} of ledger {self.address} on {self._label} did not "
                                    f"open within {timeout:.0f} s")
            time.sleep(poll_interval)


def member_address(value: str) -> str:
    """The checksummed address of ``value`` (0x + 40 hex digits; a mixed-case address must carry a
    valid EIP-55 checksum); ValueError naming the bad value otherwise."""
    from eth_utils import is_checksum_address, is_hex_address
    text = str(value).strip()
    if not is_hex_address(text):
        raise ValueError(f"member address {text!r} is not an address (expected 0x and 40 hex digits)")
    if text[2:] != text[2:].lower() and text[2:] != text[2:].upper() and not is_checksum_address(text):
        raise ValueError(f"member address {text} has a wrong EIP-55 checksum (a typo?); expected "
                         f"{to_checksum_address(text)} if that is the address you mean")
    if int(text, 16) == 0:
        raise ValueError("the zero address cannot be a member")
    return to_checksum_address(text)


def deploy_ledger(w3: Web3, admin_account: LocalAccount, model_arch: str, initial_digest: bytes | str,
                  n_rounds: int, params: Mapping[str, Any] | None = None, deadline_blocks: int = 0,
                  quorum: int = 1, *, members: Sequence[str] = (), start: bool = False,
                  max_samples: int = 2 ** 64 - 1, gas_margin: float = 1.2) -> LedgerClient:
    """Deploy a TaskLedger for one task and return a client acting as the admin.

    ``params`` is stored as canonical JSON (:func:`canonical_params`). ``deadline_blocks`` = 0: no
    deadline (a round closes only when every active member submitted); otherwise anyone may close a
    round once ``deadline_blocks`` blocks passed since it opened and ``quorum`` (>= 1) updates arrived.
    ``max_samples`` (>= 1): the largest ``n_samples`` an update may report (the contract refuses 0
    and anything above); with the ``mean`` rule it bounds what one member's update can weigh.
    ``members`` are added and the task is started if ``start``, as separate transactions.
    """
    args = [str(model_arch), digest32(initial_digest, "initial model digest"),
            uint(n_rounds, 32, "n_rounds"), canonical_params(params or {}),
            uint(deadline_blocks, 64, "deadline_blocks"), uint(quorum, 32, "quorum"),
            uint(max_samples, 64, "max_samples")]
    if args[2] < 1:
        raise ValueError("n_rounds must be at least 1")
    if args[5] < 1:
        raise ValueError("quorum must be at least 1")
    if args[6] < 1:
        raise ValueError("max_samples must be at least 1")
    members = [member_address(m) for m in members]
    if len(set(members)) != len(members):
        dup = next(m for m in members if members.count(m) > 1)
        raise ValueError(f"member {dup} is listed twice")
    receipt = LedgerClient._deploy(w3, admin_account, args, gas_margin=gas_margin)
    client = LedgerClient(w3, receipt["contractAddress"], admin_account, gas_margin=gas_margin)
    for m in members:
        client.add_member(m)
    if start:
        client.start()
    return client
