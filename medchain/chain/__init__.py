"""Chain client of medchain: connect to a chain, deploy and use its contracts.

* :func:`connect` — the embedded eth-tester chain (default) or any JSON-RPC node by URL.
* :func:`deploy_ledger`, :class:`LedgerClient` — the task ledger (contracts/TaskLedger.sol).
* :func:`deploy_bridge`, :class:`BridgeClient`, :class:`BridgeMessage` — the bridge between task
  chains (contracts/Bridge.sol; errors in :mod:`.bridge_errors`, the transfer on top of it in
  :mod:`medchain.crosschain`). Both clients share :class:`~.contract.ContractClient`.
* :func:`embedded_accounts`, :func:`key_from_env`, :func:`dev_accounts` — signing accounts.
* :func:`chain_identity`, :func:`final_block_hash` — what to record next to a result.
* :mod:`medchain.chain.anvil` — local anvil nodes (tests, ``medchain chain up``).

Refusals by a contract raise :class:`LedgerError` subclasses (see :mod:`medchain.chain.errors`).
"""
from .accounts import ANVIL_DEV_KEYS, derived_account, dev_accounts, embedded_accounts, fund, key_from_env
from .artifacts import load_artifact
from .bridge import AcceptedMessage, BridgeClient, deploy_bridge
from .bridge_errors import BridgeError
from .bridge_message import BridgeMessage
from .connection import chain_identity, connect, final_block_hash, is_embedded, redact_url
from .errors import (AlreadyAttested, AlreadyReported, AlreadySealed, AvailabilityNotDue, NoSuchUpdate,
                     SelfReport, UnsortedReport, AlreadyMember, AlreadyStarted, AlreadySubmitted, DeadlineNotPassed,
                     FutureRound, InsufficientFunds, InvalidMember, InvalidTask, LedgerError, LedgerTimeout, NoDeadline,
                     NotAdmin, NotAMember, NotStarted, PayloadTooLarge, QuorumNotReached, RoundClosed,
                     RoundNotClosed, TaskFinished, TooManySamples, TransactionReverted, ZeroDigest,
                     ZeroSamples)
from .ledger import (Attestation, LedgerClient, MemberLedger, RoundInfo, TaskInfo, Update, canonical_params,
                     deploy_ledger)
from .tx import advance_blocks, calldata_floor_gas, send_transaction

__all__ = [
    "connect", "is_embedded", "redact_url", "chain_identity", "final_block_hash",
    "embedded_accounts", "key_from_env", "dev_accounts", "derived_account", "fund", "ANVIL_DEV_KEYS",
    "load_artifact", "deploy_ledger", "LedgerClient", "TaskInfo", "Update", "Attestation", "RoundInfo",
    "MemberLedger",
    "canonical_params", "calldata_floor_gas", "advance_blocks", "send_transaction",
    "deploy_bridge", "BridgeClient", "BridgeMessage", "AcceptedMessage", "BridgeError",
    "LedgerError", "InsufficientFunds", "TransactionReverted", "LedgerTimeout", "PayloadTooLarge", "NotAdmin", "NotAMember",
    "AlreadyMember", "InvalidMember", "NotStarted", "AlreadyStarted", "TaskFinished", "FutureRound",
    "RoundClosed", "AlreadySubmitted", "ZeroDigest", "NoDeadline", "DeadlineNotPassed",
    "QuorumNotReached", "RoundNotClosed", "AlreadyAttested", "InvalidTask", "ZeroSamples", "TooManySamples",
    "AlreadyReported", "NoSuchUpdate", "SelfReport", "UnsortedReport", "AlreadySealed", "AvailabilityNotDue",
]
