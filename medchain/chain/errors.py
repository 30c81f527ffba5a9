"""Exceptions of the chain client, and decoding of revert data into them.

Every contract revert becomes a :class:`LedgerError` subclass named after the contract's custom
error (``NotAMember``, ``AlreadySubmitted``, ``RoundClosed``, ...) whose message says what was
refused and what to do; the decoded error arguments are in ``.details``. A revert whose reason
cannot be decoded becomes :class:`TransactionReverted`.

``LedgerError`` is a ``RuntimeError``, so the ``medchain`` command line prints it without a traceback.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import keccak, to_checksum_address

__all__ = [
    "LedgerError", "TransactionReverted", "LedgerTimeout", "PayloadTooLarge", "InsufficientFunds",
    "NotAdmin", "NotAMember", "AlreadyMember", "InvalidMember", "NotStarted", "AlreadyStarted",
    "TaskFinished", "FutureRound", "RoundClosed", "AlreadySubmitted", "ZeroDigest", "NoDeadline",
    "DeadlineNotPassed", "QuorumNotReached", "RoundNotClosed", "AlreadyAttested", "InvalidTask",
    "ZeroSamples", "TooManySamples", "AlreadyReported", "NoSuchUpdate", "SelfReport", "UnsortedReport",
    "AlreadySealed", "AvailabilityNotDue",
    "ERRORS", "RevertDecoder", "canonical_type", "contract_error", "revert_data_from_exception",
]


class LedgerError(RuntimeError):
    """A ledger transaction or call was refused.

    Attributes: ``reason`` (the contract's error name, or a short tag), ``details`` (decoded
    error arguments by name), ``tx_hash`` (hex, when a mined transaction reverted, else None).
    """

    reason: str = "LedgerError"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 tx_hash: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.details = dict(details or {})
        self.tx_hash = tx_hash
        if reason is not None:
            self.reason = reason


class TransactionReverted(LedgerError):
    """The transaction reverted for a reason that could not be decoded (e.g. out of gas)."""
    reason = "TransactionReverted"


class LedgerTimeout(LedgerError, TimeoutError):
    """Waiting for a ledger condition (a round to close, a receipt) took longer than allowed."""
    reason = "LedgerTimeout"


class InsufficientFunds(LedgerError):
    """The signing account cannot pay for the transaction's gas."""
    reason = "InsufficientFunds"


class PayloadTooLarge(LedgerError, ValueError):
    """The transaction needs more gas than a block holds: put the payload in the blob store."""
    reason = "PayloadTooLarge"


# One class per custom error of contracts/TaskLedger.sol, with a message template (str.format over
# the decoded arguments, plus ``contract``).
class NotAdmin(LedgerError):
    template = ("{caller} is not the admin of the task ledger {contract}; only the admin (deployer) "
                "may change membership or start the task")


class NotAMember(LedgerError):
    template = ("{caller} is not an active member of the task ledger {contract}; the admin must "
                "addMember it first")


class AlreadyMember(LedgerError):
    template = "{member} is already a member of the task ledger {contract}"


class InvalidMember(LedgerError):
    template = "{member} cannot be a member (zero address)"


class NotStarted(LedgerError):
    template = "the task on ledger {contract} has not been started yet; the admin must call start()"


class AlreadyStarted(LedgerError):
    template = "the task on ledger {contract} was already started"


class TaskFinished(LedgerError):
    template = "the task on ledger {contract} is finished: all its rounds are closed"


class FutureRound(LedgerError):
    template = ("round {round} is not open yet on ledger {contract} (the current round is "
                "{currentRound}); wait for it with wait_round_closed({currentRound})")


class RoundClosed(LedgerError):
    template = ("round {round} is already closed on ledger {contract} (the current round is "
                "{currentRound}); updates are accepted only for the current round")


class AlreadySubmitted(LedgerError):
    template = ("{member} already submitted an update for round {round} on ledger {contract}; "
                "one update per member and round")


class ZeroDigest(LedgerError):
    template = "the digest is all zeros; pass the 32-byte sha256 digest of the payload"


class NoDeadline(LedgerError):
    template = ("the task on ledger {contract} has no round deadline (roundDeadlineBlocks = 0), so "
                "a round closes only when every active member has submitted")


class DeadlineNotPassed(LedgerError):
    template = ("round {round} on ledger {contract} cannot be closed before its deadline: block "
                "{deadlineBlock} must have passed (the chain is at block {blockNumber})")


class QuorumNotReached(LedgerError):
    template = ("round {round} on ledger {contract} has {submitted} update(s), fewer than the quorum "
                "of {quorum}; it cannot be closed yet")


class RoundNotClosed(LedgerError):
    template = ("round {round} on ledger {contract} is not closed yet (the current round is "
                "{currentRound}); attest only after the round closed")


class AlreadyAttested(LedgerError):
    template = "{member} already attested round {round} on ledger {contract}"


class InvalidTask(LedgerError):
    template = "invalid task parameters: {reason}"


class ZeroSamples(LedgerError):
    template = ("an update must report at least 1 training sample (n_samples = 0 would give it a zero "
                "aggregation weight)")


class TooManySamples(LedgerError):
    template = ("the update reports n_samples={nSamples}, above the cap of {maxSamples} samples per member "
                "that the task on ledger {contract} fixed at creation")


class AlreadyReported(LedgerError):
    template = ("{member} already reported the availability of round {round}'s payloads on ledger "
                "{contract}; one report per member and round")


class NoSuchUpdate(LedgerError):
    template = ("{sender} has no counted update in round {round} on ledger {contract} (never submitted, "
                "or withdrawn): only a submitted update can be reported unavailable")


class SelfReport(LedgerError):
    template = ("{member} cannot report its own update of round {round} unavailable on ledger {contract}; "
                "list only other members' updates")


class UnsortedReport(LedgerError):
    template = ("the senders reported unavailable for round {round} must be listed in strictly increasing "
                "address order, without repeats (LedgerClient.report_availability sorts them)")


class AlreadySealed(LedgerError):
    template = ("the availability of round {round}'s payloads on ledger {contract} is already sealed: "
                "reports are final, aggregate the round as the chain records it")


class AvailabilityNotDue(LedgerError):
    template = ("round {round}'s availability on ledger {contract} cannot be sealed yet: {reports} of "
                "{members} member(s) reported, and the deadline (block {deadlineBlock}; 0 = none) has not "
                "passed with the quorum; wait for the other members' reports")


ERRORS: dict[str, type[LedgerError]] = {
    cls.__name__: cls for cls in (
        NotAdmin, NotAMember, AlreadyMember, InvalidMember, NotStarted, AlreadyStarted,
        TaskFinished, FutureRound, RoundClosed, AlreadySubmitted, ZeroDigest, NoDeadline,
        DeadlineNotPassed, QuorumNotReached, RoundNotClosed, AlreadyAttested, InvalidTask,
        ZeroSamples, TooManySamples, AlreadyReported, NoSuchUpdate, SelfReport, UnsortedReport,
        AlreadySealed, AvailabilityNotDue)
}
for _name, _cls in ERRORS.items():
    _cls.reason = _name

_ERROR_STRING = keccak(text="Error(string)")[:4]
_PANIC = keccak(text="Panic(uint256)")[:4]


def canonical_type(inp: dict) -> str:
    """The canonical ABI type of an ABI input/output entry (tuples spelled out), as in selectors."""
    t = inp["type"]
    if t.startswith("tuple"):
        inner = ",".join(canonical_type(c) for c in inp["components"])
        return f"({inner}){t[5:]}"
    return t


def _fmt(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return value


def contract_error(cls: type[LedgerError], contract: str, details: Mapping[str, Any], *,
                   tx_hash: str | None = None) -> LedgerError:
    """The exception ``cls`` (an error-table class with a ``template``) for a refusal by
    ``contract`` with the error's arguments ``details``; bytes arguments read as 0x-hex in the
    message. Used for decoded reverts and for refusals a client finds before sending."""
    msg = cls.template.format(contract=contract, **{k: _fmt(v) for k, v in details.items()})
    return cls(f"{cls.__name__}: {msg}", details=dict(details), tx_hash=tx_hash)


class RevertDecoder:
    """Turns raw revert data into the matching :class:`LedgerError`, using an ABI's error entries
    and an error table ``errors`` (custom error name -> class; default :data:`ERRORS`, the
    TaskLedger's). An error of the ABI missing from the table becomes :class:`TransactionReverted`."""

    def __init__(self, abi: list[dict], errors: Mapping[str, type[LedgerError]] | None = None):
        self._errors = ERRORS if errors is None else errors
        self._by_selector: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for entry in abi:
            if entry.get("type") != "error":
                continue
            types = [canonical_type(i) for i in entry["inputs"]]
            names = [i["name"] for i in entry["inputs"]]
            sel = keccak(text=f"{entry['name']}({','.join(types)})")[:4]
            self._by_selector[sel] = (entry["name"], types, names)

    def decode(self, data: bytes | None, *, contract: str = "?", tx_hash: str | None = None,
               fallback: str = "") -> LedgerError:
        """The exception for revert ``data`` (bytes; None or b"" when the node gave none)."""
        if data and len(data) >= 4:
            sel, body = data[:4], data[4:]
            if sel in self._by_selector:
                name, types, names = self._by_selector[sel]
                try:
                    values = abi_decode(types, body)
                except Exception:  # noqa: BLE001 - malformed data: fall through to generic
                    values = None
                if values is not None:
                    details = {n: (to_checksum_address(v) if t == "address" else v)
                               for n, t, v in zip(names, types, values)}
                    cls = self._errors.get(name)
                    if cls is None:
                        args = ", ".join(f"{k}={v}" for k, v in details.items())
                        return TransactionReverted(f"the contract {contract} reverted with {name}({args})",
                                                   details=details, tx_hash=tx_hash, reason=name)
                    return contract_error(cls, contract, details, tx_hash=tx_hash)
            if sel == _ERROR_STRING:
                try:
                    (text,) = abi_decode(["string"], body)
                    return TransactionReverted(f"the contract {contract} reverted: {text}",
                                               details={"message": text}, tx_hash=tx_hash,
                                               reason="Error")
                except Exception:  # noqa: BLE001
                    pass
            if sel == _PANIC:
                try:
                    (code,) = abi_decode(["uint256"], body)
                    return TransactionReverted(
                        f"the contract {contract} panicked with code {code:#x} (a bug in the contract "
                        "or an arithmetic overflow)", details={"code": code}, tx_hash=tx_hash,
                        reason="Panic")
                except Exception:  # noqa: BLE001
                    pass
        extra = f": {fallback}" if fallback else ""
        return TransactionReverted(f"the transaction to {contract} reverted without a decodable "
                                   f"reason{extra}", tx_hash=tx_hash)


_BYTES_LITERAL = re.compile(r"""(b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*")""", re.S)
_HEX = re.compile(r"0x[0-9a-fA-F]{8,}")


def revert_data_from_exception(exc: BaseException) -> tuple[bytes | None, bool]:
    """Extract revert data from an exception raised by web3.py or eth-tester.

    Returns ``(data, is_revert)``: ``is_revert`` says whether ``exc`` is an execution revert at
    all (as opposed to, e.g., a connection error); ``data`` is the raw revert data if available.
    """
    from web3.exceptions import ContractLogicError

    if isinstance(exc, ContractLogicError):
        data = exc.data
        if isinstance(data, dict):
            data = data.get("data")
        if isinstance(data, str) and data.startswith("0x"):
            try:
                return bytes.fromhex(data[2:]), True
            except ValueError:
                pass
        return None, True
    try:
        from eth_tester.exceptions import TransactionFailed
    except ImportError:  # pragma: no cover - eth-tester is a dependency
        TransactionFailed = ()  # type: ignore[assignment]
    if TransactionFailed and isinstance(exc, TransactionFailed):
        msg = str(exc.args[0]) if exc.args else ""
        if exc.args and isinstance(exc.args[0], (bytes, bytearray)):
            return bytes(exc.args[0]), True
        m = _BYTES_LITERAL.search(msg)
        if m:
            try:
                return ast.literal_eval(m.group(1)), True
            except (ValueError, SyntaxError):
                pass
        m = _HEX.search(msg)
        if m:
            return bytes.fromhex(m.group(0)[2:]), True
        return None, True
    # Some nodes answer eth_estimateGas on a revert with a JSON-RPC error (code 3, data = revert data).
    from web3.exceptions import Web3RPCError
    if isinstance(exc, Web3RPCError):
        rpc = getattr(exc, "rpc_response", None) or {}
        err = rpc.get("error", {}) if isinstance(rpc, dict) else {}
        text = str(err.get("message", exc))
        if "revert" in text.lower():
            data = err.get("data")
            if isinstance(data, dict):
                data = data.get("data")
            if isinstance(data, str) and data.startswith("0x"):
                try:
                    return bytes.fromhex(data[2:]), True
                except ValueError:
                    pass
            return None, True
    return None, False
