"""Client of the Bridge contract (contracts/Bridge.sol), which accepts messages from registered
source tasks on other chains when a quorum of the source's members signed them
(:mod:`.bridge_message`). Contract refusals raise the :class:`~.bridge_errors.BridgeError` subclass
named after the contract's custom error (``UnknownSource``, ``UnknownSigner``, ``DuplicateSigner``,
``BelowQuorum``, ``AlreadyAccepted``, the ``MalformedSignature`` family, ...); a refused relay is
simulated first, so it sends nothing and changes nothing. The rules are in contracts/README.md; the
transfer built on it (relayer, signing members, receiver) is :mod:`medchain.crosschain`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from .bridge_errors import BRIDGE_ERRORS, BridgeError, MessageNotAccepted
from .bridge_message import BridgeMessage, sign_message
from .connection import chain_identity, with_retries
from .contract import ContractClient, digest32, uint

__all__ = ["CONTRACT_NAME", "AcceptedMessage", "BridgeClient", "deploy_bridge"]

CONTRACT_NAME = "Bridge"


@dataclass(frozen=True)
class AcceptedMessage:
    """A message the bridge accepted. ``signers`` and ``relayer`` come from the ``MessageRelayed``
    event (empty / None when read with :meth:`BridgeClient.message`, which reads storage only)."""

    id: bytes
    source_chain_id: int
    source_ledger: str
    source_round: int
    digest: bytes
    kind: int
    payload_size: int
    inline: bool
    accepted_block: int
    signer_count: int
    signers: tuple[str, ...] = ()
    relayer: str | None = None
    tx_hash: str | None = None

    @property
    def message(self) -> BridgeMessage:
        """The message without its payload (same id)."""
        return BridgeMessage(self.source_chain_id, self.source_ledger, self.source_round, self.digest,
                             self.kind, self.payload_size)

    @property
    def source_identity(self) -> str:
        return f"eip155:{self.source_chain_id}:{self.source_ledger}"


class BridgeClient(ContractClient):
    """Client of a deployed Bridge at ``address``, acting as ``account`` (None: read-only).

    deploy_block: the block the bridge was deployed in (read from the contract if None); event
    queries (:meth:`messages`) start there. Transactions are simulated first: a refused call raises
    a :class:`BridgeError` subclass and changes nothing.
    """

    CONTRACT_NAME = CONTRACT_NAME
    ERRORS = BRIDGE_ERRORS
    ERROR = BridgeError

    def __init__(self, w3: Web3, address: str, account: LocalAccount | None = None, *,
                 deploy_block: int | None = None, gas_margin: float = 1.2, tx_timeout: float = 120.0):
        super().__init__(w3, address, account, gas_margin=gas_margin, tx_timeout=tx_timeout)
        self._deploy_block = deploy_block
        self._chain_id: int | None = None

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = with_retries(lambda: self.w3.eth.chain_id, what="eth_chainId", label=self._label)
        return self._chain_id

    @property
    def identity(self) -> str:
        """``eip155:<chain id>:<bridge address>``."""
        return chain_identity(self.w3, self.address)

    @property
    def deploy_block(self) -> int:
        if self._deploy_block is None:
            self._deploy_block = self._call("deployBlock")[0]
        return self._deploy_block

    # ------------------------------------------------------------------ governance
    def register_source(self, chain_id: int, ledger_address: str, signers: Sequence[str], quorum: int):
        """Admin only: accept messages from the task ledger ``ledger_address`` on chain ``chain_id``
        signed by at least ``quorum`` distinct addresses of ``signers``. Registering a source again
        replaces its signers and quorum. Returns the receipt."""
        return self._transact("registerSource", uint(chain_id, 256, "chain_id"),
                              to_checksum_address(ledger_address),
                              [to_checksum_address(s) for s in signers], uint(quorum, 32, "quorum"))

    def remove_source(self, chain_id: int, ledger_address: str):
        """Admin only: stop accepting messages from that source (accepted ones stay recorded)."""
        return self._transact("removeSource", uint(chain_id, 256, "chain_id"), to_checksum_address(ledger_address))

    # ------------------------------------------------------------------ relay
    def relay(self, message: BridgeMessage, signatures: Sequence[bytes], *, gas: int | None = None):
        """Submit ``message`` with members' ``signatures`` (anyone may). Returns the receipt; the
        message id is ``message.id()``. Raises the contract's refusal (``UnknownSource``,
        ``UnknownSigner``, ``DuplicateSigner``, ``BelowQuorum``, ``AlreadyAccepted``,
        ``MalformedSignature`` subclasses, ``PayloadMismatch``, ...) without changing anything."""
        return self._transact("relay", message.abi_tuple(), [bytes(s) for s in signatures], gas=gas)

    def signature_for(self, account: LocalAccount, message: BridgeMessage) -> bytes:
        """``account``'s signature of ``message`` for this bridge (see :func:`sign_message`)."""
        return sign_message(account, message, self.chain_id, self.address)

    # ------------------------------------------------------------------ views
    def admin(self) -> str:
        return to_checksum_address(self._call("admin")[0])

    def accepted(self, message_id: bytes | str) -> bool:
        return bool(self._call("accepted", digest32(message_id, "message id"))[0])

    def message(self, message_id: bytes | str) -> AcceptedMessage:
        """The stored record of an accepted message; raises :class:`MessageNotAccepted` otherwise."""
        mid = digest32(message_id, "message id")
        (rec,) = self._call("message", mid)
        cid, ledger, rnd, kind, inline, digest, size, block, nsig = rec
        if block == 0:
            raise MessageNotAccepted(f"the bridge {self.address} on {self._label} has not accepted a "
                                     f"message with id 0x{mid.hex()}", details={"id": mid})
        return AcceptedMessage(mid, cid, to_checksum_address(ledger), rnd, bytes(digest), kind, size,
                               bool(inline), block, nsig)

    def message_id(self, message: BridgeMessage) -> bytes:
        """The contract's ``messageId(message)`` (equal to ``message.id()``)."""
        return bytes(self._call("messageId", message.abi_tuple())[0])

    def signing_hash(self, message: BridgeMessage) -> bytes:
        """The contract's ``signingHash(message)`` (equal to ``message.signing_hash(chain id, address)``)."""
        return bytes(self._call("signingHash", message.abi_tuple())[0])

    def domain_separator(self) -> bytes:
        return bytes(self._call("domainSeparator")[0])

    def sources(self) -> list[tuple[int, str]]:
        """Registered sources as ``(chain id, ledger address)``, in registration order."""
        cids, ledgers = self._call("sources")
        return [(c, to_checksum_address(a)) for c, a in zip(cids, ledgers)]

    def is_registered(self, chain_id: int, ledger_address: str) -> bool:
        return bool(self._call("isRegistered", int(chain_id), to_checksum_address(ledger_address))[0])

    def signers(self, chain_id: int, ledger_address: str) -> list[str]:
        return [to_checksum_address(a) for a in
                self._call("signers", int(chain_id), to_checksum_address(ledger_address))[0]]

    def is_signer(self, chain_id: int, ledger_address: str, account: str) -> bool:
        return bool(self._call("isSigner", int(chain_id), to_checksum_address(ledger_address),
                               to_checksum_address(account))[0])

    def quorum(self, chain_id: int, ledger_address: str) -> int:
        """The source's quorum (0: not registered)."""
        return self._call("quorum", int(chain_id), to_checksum_address(ledger_address))[0]

    def messages(self, from_block: int | None = None, to_block: int | None = None) -> list[AcceptedMessage]:
        """Accepted messages in chain order, from the ``MessageAccepted`` / ``MessageRelayed`` events
        over ``[from_block (default: the deploy block), to_block (default: latest)]``, queried in
        bounded chunks."""
        lo = self.deploy_block if from_block is None else int(from_block)
        hi = self.block_number() if to_block is None else int(to_block)
        acc_ev, rel_ev = self._abi.events["MessageAccepted"], self._abi.events["MessageRelayed"]
        relayed: dict[bytes, tuple[str, tuple[str, ...]]] = {}
        for lg in self._logs("MessageRelayed", lo, hi):
            mid = bytes(lg["topics"][1])
            (relayer,) = abi_decode(["address"], bytes(lg["topics"][2]))
            sigs, _size, _payload = abi_decode([t for _, t in rel_ev["data"]], bytes(lg["data"]))
            relayed[mid] = (to_checksum_address(relayer), tuple(to_checksum_address(a) for a in sigs))
        out = []
        for lg in self._logs("MessageAccepted", lo, hi):
            mid = bytes(lg["topics"][1])
            cid, ledger, rnd, digest, kind = abi_decode([t for _, t in acc_ev["data"]], bytes(lg["data"]))
            rec = self.message(mid)
            relayer, sigs = relayed.get(mid, (None, ()))
            out.append((lg["blockNumber"], lg["logIndex"], AcceptedMessage(
                mid, cid, to_checksum_address(ledger), rnd, bytes(digest), kind, rec.payload_size, rec.inline,
                lg["blockNumber"], rec.signer_count, sigs, relayer, "0x" + bytes(lg["transactionHash"]).hex())))
        out.sort(key=lambda t: (t[0], t[1]))
        return [m for _, _, m in out]

    def inline_payload(self, message_id: bytes | str) -> bytes:
        """The inline payload of an accepted message (b"" if its payload lives in a blob store),
        read from the ``MessageRelayed`` event of its acceptance block."""
        rec = self.message(message_id)
        if not rec.inline:
            return b""
        ev = self._abi.events["MessageRelayed"]
        logs = self._logs("MessageRelayed", rec.accepted_block, rec.accepted_block,
                          ["0x" + rec.id.hex()])
        if not logs:
            raise BridgeError(f"no MessageRelayed event for message 0x{rec.id.hex()} in block "
                              f"{rec.accepted_block} on {self._label} (pruned logs?)", reason="NoEvent")
        _sigs, _size, payload = abi_decode([t for _, t in ev["data"]], bytes(logs[0]["data"]))
        return bytes(payload)


def deploy_bridge(w3: Web3, admin_account: LocalAccount, *, gas_margin: float = 1.2) -> BridgeClient:
    """Deploy a Bridge on the chain of ``w3``; ``admin_account`` (the chain's governance) becomes its
    admin. Returns a client acting as the admin, which knows the deploy block."""
    receipt = BridgeClient._deploy(w3, admin_account, gas_margin=gas_margin)
    return BridgeClient(w3, receipt["contractAddress"], admin_account, deploy_block=receipt["blockNumber"],
                        gas_margin=gas_margin)
