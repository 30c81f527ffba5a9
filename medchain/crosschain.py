"""Attested peer-to-peer transfer between task chains (contracts/Bridge.sol).

One chain per task: a task is identified by its chain id *and* its ledger address
(:func:`medchain.chain.chain_identity`; in-process eth-tester chains all share one chain id). A task
on chain B uses auxiliary information from a similar task on chain A — the global model of a closed
round, for warm start or L2-SP regularization (:mod:`medchain.transfer`) — sent peer to peer:

1. chain B's governance deploys a :class:`Bridge <BridgeClient>` (:func:`deploy_bridge`) and registers
   chain A's task as a *source*: ``(chain id, ledger address) -> (signers, quorum k)``, the signers
   being members of chain A's task;
2. chain A's members publish the global model they computed (:func:`publish_global_model`: the
   payload ``layout_id ‖ w`` whose sha256 *is* the global-model digest they attested on chain A);
3. anyone runs a :class:`Relayer`: it watches chain A's ledger for a finished task / closed round,
   takes the round's majority attested digest, builds a :class:`BridgeMessage`, gathers members'
   signatures (each member signs only a digest equal to the one it computed itself:
   :class:`MemberSigner`), copies the payload to chain B's blob store (or puts it inline when small)
   and submits it to the bridge, which accepts it only with ``k`` valid signatures by distinct
   registered signers;
4. on chain B, :func:`receive` returns the payload, verified against the accepted digest.

**Message and signature format.** A message is ``(sourceChainId uint256, sourceLedger address,
sourceRound uint32, digest bytes32, kind uint8, payloadSize uint64)`` plus an optional inline payload
(bound by ``digest = sha256(payload)``, which the contract checks). Its id is the EIP-712 struct hash

    id = keccak256(abi.encode(MESSAGE_TYPEHASH, sourceChainId, sourceLedger, sourceRound, digest,
                              kind, payloadSize))
    MESSAGE_TYPEHASH = keccak256("Message(uint256 sourceChainId,address sourceLedger,"
                                 "uint32 sourceRound,bytes32 digest,uint8 kind,uint64 payloadSize)")

and members sign (65-byte ``r ‖ s ‖ v``, eth-account, local key) the EIP-712 hash

    keccak256(0x19 0x01 ‖ domainSeparator ‖ id),  domain = EIP712Domain(name "medchain Bridge",
    version "1", chainId = destination chain id, verifyingContract = bridge address)

so a signature is valid on one bridge of one chain only. Contract refusals raise the
:class:`BridgeError` subclass named after the contract's custom error (``UnknownSource``,
``UnknownSigner``, ``DuplicateSigner``, ``BelowQuorum``, ``AlreadyAccepted``, the
:class:`MalformedSignature` family, ...); a refused relay is simulated first, so it sends nothing and
changes nothing. The rules are in contracts/README.md.

Example::

    bridge = deploy_bridge(w3_b, governance)
    bridge.register_source(chain_id_a, ledger_a.address, [m.address for m in members_a], quorum=2)
    relayer = Relayer(ledger_a_readonly, bridge.as_account(anyone), source_store, dest_store)
    result = relayer.relay([MemberSigner(m, {r: digest_m}) for m, digest_m in ...])
    payload = receive(bridge, result.id, dest_store)
    w_source = parse_model_payload(payload, source_layout)
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from web3 import Web3

from medchain.blobstore import BlobNotFound, BlobStore, fetch_payload
from medchain.chain.artifacts import load_artifact
from medchain.chain.connection import chain_identity, node_label, with_retries
from medchain.chain.errors import LedgerError, RevertDecoder, ZeroDigest, _canonical_type
from medchain.chain.ledger import LedgerClient, _Abi, _digest32, _uint
from medchain.chain.tx import call, send_transaction
from medchain.codec import DigestMismatch, digest as sha256_digest
from medchain.params import Layout, digest_vector

__all__ = [
    "KIND_GLOBAL_MODEL", "CONTRACT_NAME", "DOMAIN_NAME", "DOMAIN_VERSION", "MESSAGE_TYPE",
    "BridgeMessage", "AcceptedMessage", "BridgeClient", "deploy_bridge", "sign_message", "recover_signer",
    "domain_separator",
    "MemberSigner", "Relayer", "RelayResult", "receive",
    "model_payload", "parse_model_payload", "publish_global_model",
    # errors
    "BridgeError", "NotBridgeAdmin", "InvalidSource", "InvalidQuorum", "InvalidSigner", "RepeatedSigner",
    "UnknownSource", "PayloadSizeMismatch", "PayloadMismatch", "AlreadyAccepted", "MalformedSignature",
    "SignatureWrongLength", "SignatureHighS", "SignatureBadV", "SignatureUnrecoverable", "UnknownSigner",
    "DuplicateSigner", "BelowQuorum", "MessageNotAccepted", "PayloadUnavailable",
    "ReceivedPayloadMismatch", "SignatureRefused", "NothingToRelay", "BRIDGE_ERRORS",
]

log = logging.getLogger("medchain.chain")

CONTRACT_NAME = "Bridge"
#: Message kind: the global model of a closed round (warm start / L2-SP regularization).
KIND_GLOBAL_MODEL = 1
DOMAIN_NAME = "medchain Bridge"
DOMAIN_VERSION = "1"
MESSAGE_TYPE = ("Message(uint256 sourceChainId,address sourceLedger,uint32 sourceRound,bytes32 digest,"
                "uint8 kind,uint64 payloadSize)")
_MESSAGE_TYPEHASH = keccak(text=MESSAGE_TYPE)
_DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
_MESSAGE_ABI = "(uint256,address,uint32,bytes32,uint8,uint64,bytes)"


# ====================================================================== errors
class BridgeError(LedgerError):
    """A bridge transaction, call or transfer step was refused (a :class:`LedgerError`)."""
    reason = "BridgeError"


class NotBridgeAdmin(BridgeError):
    template = ("{caller} is not the admin of the bridge {contract}; only its admin (the destination "
                "chain's governance) registers or removes sources")


class InvalidSource(BridgeError):
    template = ("cannot register source (chain {chainId}, ledger {ledger}) on bridge {contract}: the "
                "chain id and the ledger address must be non-zero")


class InvalidQuorum(BridgeError):
    template = ("quorum {quorum} is invalid for {signerCount} signer(s) on bridge {contract}: it must "
                "be at least 1 and at most the number of signers")


class InvalidSigner(BridgeError):
    template = "{signer} cannot be a signer (zero address)"


class RepeatedSigner(BridgeError):
    template = "{signer} is listed twice in the signer set; list each signer once"


class UnknownSource(BridgeError):
    template = ("the bridge {contract} has no registered source for chain {sourceChainId}, ledger "
                "{sourceLedger}; check the message's source chain id and ledger address, or have the "
                "bridge admin register_source(...) that task")


class PayloadSizeMismatch(BridgeError):
    template = ("the inline payload has {inlineLength} bytes but the message announces payloadSize "
                "{payloadSize}")


class PayloadMismatch(BridgeError):
    template = ("the inline payload does not match the message digest: its sha256 is {payloadSha256}, "
                "the message carries {digest} (tampered or wrong payload)")


class AlreadyAccepted(BridgeError):
    template = ("message {id} was already accepted by the bridge {contract}: replay refused (a message "
                "is accepted at most once)")


class MalformedSignature(BridgeError):
    """A signature that is not a canonical 65-byte ECDSA signature (base of the four cases)."""


class SignatureWrongLength(MalformedSignature):
    template = "signature #{index} is malformed: {length} bytes, expected 65 (r ‖ s ‖ v)"


class SignatureHighS(MalformedSignature):
    template = ("signature #{index} is malformed: its s value lies in the upper half of the curve "
                "order (a malleable signature); sign with eth-account, which makes canonical ones")


class SignatureBadV(MalformedSignature):
    template = "signature #{index} is malformed: v = {v}, expected 27 or 28"


class SignatureUnrecoverable(MalformedSignature):
    template = "signature #{index} is malformed: no signer can be recovered from it"


class UnknownSigner(BridgeError):
    template = ("signature #{index} recovers to {signer}, which is not a registered signer of the "
                "message's source on bridge {contract}: a forged signature, a key that is not a "
                "registered member, a tampered message, or a signature made for another bridge or "
                "chain id (the EIP-712 domain binds both)")


class DuplicateSigner(BridgeError):
    template = ("signature #{index} is another signature by {signer}; each signer counts once, so "
                "drop the duplicate and add a signature by another member")


class BelowQuorum(BridgeError):
    template = ("only {valid} valid signature(s), but the source's quorum on bridge {contract} is "
                "{quorum}; gather signatures of more registered members")


class MessageNotAccepted(BridgeError):
    """The bridge has not accepted a message with this id."""
    reason = "MessageNotAccepted"


class PayloadUnavailable(BridgeError, LookupError):
    """The payload of an accepted message is not inline and not in the given blob store."""
    reason = "PayloadUnavailable"


class ReceivedPayloadMismatch(BridgeError, DigestMismatch):
    """The payload found for an accepted message does not hash to its digest (or has another size)."""
    reason = "ReceivedPayloadMismatch"


class SignatureRefused(BridgeError):
    """A member refused to sign a message (not the global model it computed, wrong source, ...)."""
    reason = "SignatureRefused"


class NothingToRelay(BridgeError):
    """The source task has no closed, attested round to relay (yet)."""
    reason = "NothingToRelay"


#: The Python exception of each custom error of contracts/Bridge.sol.
BRIDGE_ERRORS: dict[str, type[LedgerError]] = {
    cls.__name__: cls for cls in (
        NotBridgeAdmin, InvalidSource, InvalidQuorum, InvalidSigner, RepeatedSigner, UnknownSource,
        PayloadSizeMismatch, PayloadMismatch, AlreadyAccepted, SignatureWrongLength, SignatureHighS,
        SignatureBadV, SignatureUnrecoverable, UnknownSigner, DuplicateSigner, BelowQuorum, ZeroDigest)
}
for _name, _cls in BRIDGE_ERRORS.items():
    if _cls is not ZeroDigest:
        _cls.reason = _name


def _fmt(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    return value


class _BridgeRevertDecoder(RevertDecoder):
    """RevertDecoder that maps the Bridge's custom errors onto :data:`BRIDGE_ERRORS`."""

    def __init__(self, abi: list[dict]):
        super().__init__(abi)
        self._mine: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for entry in abi:
            if entry.get("type") == "error" and entry["name"] in BRIDGE_ERRORS:
                types = [_canonical_type(i) for i in entry["inputs"]]
                sel = keccak(text=f"{entry['name']}({','.join(types)})")[:4]
                self._mine[sel] = (entry["name"], types, [i["name"] for i in entry["inputs"]])

    def decode(self, data: bytes | None, *, contract: str = "?", tx_hash: str | None = None,
               fallback: str = "") -> LedgerError:
        if data and len(data) >= 4 and data[:4] in self._mine:
            name, types, names = self._mine[data[:4]]
            try:
                values = abi_decode(types, data[4:])
            except Exception:  # noqa: BLE001 - malformed: generic decoding below
                values = None
            if values is not None:
                details = {n: (to_checksum_address(v) if t == "address" else v)
                           for n, t, v in zip(names, types, values)}
                cls = BRIDGE_ERRORS[name]
                msg = cls.template.format(contract=contract, **{k: _fmt(v) for k, v in details.items()})
                return cls(f"{name}: {msg}", details=details, tx_hash=tx_hash)
        return super().decode(data, contract=contract, tx_hash=tx_hash, fallback=fallback)


def _error(cls: type[BridgeError], contract: str, **details: Any) -> BridgeError:
    """The exception the contract would raise, built client-side (same message)."""
    msg = cls.template.format(contract=contract, **{k: _fmt(v) for k, v in details.items()})
    return cls(f"{cls.__name__}: {msg}", details=details)


@functools.lru_cache(maxsize=None)
def _codec() -> tuple[_Abi, _BridgeRevertDecoder]:
    abi = load_artifact(CONTRACT_NAME)["abi"]
    return _Abi(abi), _BridgeRevertDecoder(abi)


# ====================================================================== messages
def domain_separator(bridge_chain_id: int, bridge_address: str) -> bytes:
    """The EIP-712 domain separator of the bridge at ``bridge_address`` on chain ``bridge_chain_id``."""
    return keccak(abi_encode(
        ["bytes32", "bytes32", "bytes32", "uint256", "address"],
        [_DOMAIN_TYPEHASH, keccak(text=DOMAIN_NAME), keccak(text=DOMAIN_VERSION),
         _uint(bridge_chain_id, 256, "bridge chain id"), to_checksum_address(bridge_address)]))


@dataclass(frozen=True)
class BridgeMessage:
    """A message from a source task (chain ``source_chain_id``, ledger ``source_ledger``) to a bridge.

    digest: 32 bytes, sha256 of the payload (for ``kind`` 1, the global-model digest attested on
    the source chain, see :func:`model_payload`). payload_size: bytes of the payload. payload: the
    payload itself when it travels inline (else empty: it travels through a blob store). Neither the
    id nor the signatures cover ``payload``: it is bound by ``digest``.
    """

    source_chain_id: int
    source_ledger: str
    source_round: int
    digest: bytes
    kind: int = KIND_GLOBAL_MODEL
    payload_size: int = 0
    payload: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_chain_id", _uint(self.source_chain_id, 256, "source_chain_id"))
        object.__setattr__(self, "source_ledger", to_checksum_address(self.source_ledger))
        object.__setattr__(self, "source_round", _uint(self.source_round, 32, "source_round"))
        object.__setattr__(self, "digest", _digest32(self.digest))
        object.__setattr__(self, "kind", _uint(self.kind, 8, "kind"))
        object.__setattr__(self, "payload_size", _uint(self.payload_size, 64, "payload_size"))
        object.__setattr__(self, "payload", bytes(self.payload))

    @property
    def source_identity(self) -> str:
        """``eip155:<chain id>:<ledger>``, as :func:`medchain.chain.chain_identity`."""
        return f"eip155:{self.source_chain_id}:{self.source_ledger}"

    def id(self) -> bytes:
        """The message id (32 bytes): the EIP-712 struct hash, as the contract's ``messageId``."""
        return keccak(abi_encode(
            ["bytes32", "uint256", "address", "uint32", "bytes32", "uint8", "uint64"],
            [_MESSAGE_TYPEHASH, self.source_chain_id, self.source_ledger, self.source_round, self.digest,
             self.kind, self.payload_size]))

    def signable(self, bridge_chain_id: int, bridge_address: str) -> SignableMessage:
        """The EIP-191 version 0x01 (EIP-712) signable form for one bridge on one chain."""
        return SignableMessage(b"\x01", domain_separator(bridge_chain_id, bridge_address), self.id())

    def signing_hash(self, bridge_chain_id: int, bridge_address: str) -> bytes:
        """keccak256(0x1901 ‖ domainSeparator ‖ id): what members sign, as the contract's ``signingHash``."""
        return keccak(b"\x19\x01" + domain_separator(bridge_chain_id, bridge_address) + self.id())

    def with_payload(self, payload: bytes) -> "BridgeMessage":
        """The same message with ``payload`` inline (checked against digest and size)."""
        payload = bytes(payload)
        if sha256_digest(payload) != self.digest or len(payload) != self.payload_size:
            raise ValueError(f"payload of {len(payload)} bytes does not match message {self.id().hex()} "
                             f"(digest {self.digest.hex()}, {self.payload_size} bytes)")
        return BridgeMessage(self.source_chain_id, self.source_ledger, self.source_round, self.digest,
                             self.kind, self.payload_size, payload)

    def without_payload(self) -> "BridgeMessage":
        """The same message (same id), its payload left to a blob store."""
        return BridgeMessage(self.source_chain_id, self.source_ledger, self.source_round, self.digest,
                             self.kind, self.payload_size, b"")

    def abi_tuple(self) -> tuple:
        return (self.source_chain_id, self.source_ledger, self.source_round, self.digest, self.kind,
                self.payload_size, self.payload)


def sign_message(account: LocalAccount, message: BridgeMessage, bridge_chain_id: int,
                 bridge_address: str) -> bytes:
    """``account``'s 65-byte signature (``r ‖ s ‖ v``, v ∈ {27, 28}, low s) of ``message`` for the
    bridge at ``bridge_address`` on chain ``bridge_chain_id`` (signed locally with eth-account)."""
    return bytes(account.sign_message(message.signable(bridge_chain_id, bridge_address)).signature)


def recover_signer(message: BridgeMessage, signature: bytes, bridge_chain_id: int,
                   bridge_address: str) -> str | None:
    """The address that made ``signature`` for ``message`` on that bridge (None if malformed)."""
    sig = bytes(signature)
    if len(sig) != 65 or sig[64] not in (27, 28):
        return None
    try:
        return Account.recover_message(message.signable(bridge_chain_id, bridge_address), signature=sig)
    except Exception:  # noqa: BLE001 - malformed signature
        return None


# ====================================================================== payload of a global model
def model_payload(vec, layout: Layout) -> bytes:
    """The transfer payload of a global model: ``layout_id (32 B) ‖ vec as little-endian float32``.

    Its sha256 equals :func:`medchain.params.digest_vector` ``(vec, layout)``: the digest the members
    attested on the source chain is the digest of the payload, so every receiver can check it.
    """
    d = digest_vector(vec, layout)  # validates shape and dtype
    payload = layout.layout_id + np.ascontiguousarray(vec, dtype="<f4").tobytes()
    assert sha256_digest(payload) == d
    return payload


def parse_model_payload(payload: bytes, layout: Layout) -> np.ndarray:
    """The float32 vector ``(P,)`` of a :func:`model_payload`, checked against ``layout`` (the source
    model's layout: same architecture, channels and number of classes as the source task)."""
    payload = bytes(payload)
    if len(payload) < 32 or payload[:32] != layout.layout_id:
        got = payload[:32].hex()[:12] if len(payload) >= 32 else f"{len(payload)} bytes"
        raise ValueError(f"the payload's model layout ({got}…) is not the given layout "
                         f"({layout.layout_id_hex[:12]}…): build the source model's layout (same "
                         "architecture, input channels and number of classes as the source task)")
    if len(payload) != 32 + 4 * layout.size:
        raise ValueError(f"the payload has {len(payload) - 32} bytes of values, expected "
                         f"{4 * layout.size} for {layout.size} float32 coordinates")
    return np.frombuffer(payload, dtype="<f4", offset=32).astype(np.float32)


def publish_global_model(store: BlobStore, vec, layout: Layout) -> bytes:
    """Put the :func:`model_payload` of ``vec`` into ``store``; returns its digest (= the attested
    global-model digest)."""
    return store.put(model_payload(vec, layout))


# ====================================================================== client
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


class BridgeClient:
    """Client of a deployed Bridge at ``address``, acting as ``account`` (None: read-only).

    deploy_block: the block the bridge was deployed in (read from the contract if None); event
    queries (:meth:`messages`) start there. Transactions are simulated first: a refused call raises
    a :class:`BridgeError` subclass and changes nothing.
    """

    def __init__(self, w3: Web3, address: str, account: LocalAccount | None = None, *,
                 deploy_block: int | None = None, gas_margin: float = 1.2, tx_timeout: float = 120.0):
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.account = account
        self.gas_margin = gas_margin
        self.tx_timeout = tx_timeout
        self._abi, self._decoder = _codec()
        self._label = node_label(w3)
        self._deploy_block = deploy_block
        self._chain_id: int | None = None

    def __repr__(self) -> str:
        who = self.account.address if self.account is not None else "read-only"
        return f"BridgeClient({self.address} on {self._label}, as {who})"

    def as_account(self, account: LocalAccount | None) -> "BridgeClient":
        """The same bridge, acting as another account."""
        c = BridgeClient(self.w3, self.address, account, deploy_block=self._deploy_block,
                         gas_margin=self.gas_margin, tx_timeout=self.tx_timeout)
        c._chain_id = self._chain_id
        return c

    # ------------------------------------------------------------------ plumbing
    def _call(self, name: str, *args: Any) -> tuple:
        raw = call(self.w3, self.address, self._abi.encode(name, *args), decoder=self._decoder,
                   contract=self.address)
        if not raw:
            raise BridgeError(f"no contract code at {self.address} on {self._label} (wrong address or "
                              "chain?)", reason="NoContract")
        return self._abi.decode(name, raw)

    def _transact(self, name: str, *args: Any, gas: int | None = None):
        if self.account is None:
            raise ValueError(f"{name}() sends a transaction: create the BridgeClient with an account")
        return send_transaction(self.w3, self.account, {"to": self.address, "data": self._abi.encode(name, *args)},
                                decoder=self._decoder, contract=self.address, gas=gas,
                                gas_margin=self.gas_margin, timeout=self.tx_timeout)

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
        return self._transact("registerSource", _uint(chain_id, 256, "chain_id"),
                              to_checksum_address(ledger_address),
                              [to_checksum_address(s) for s in signers], _uint(quorum, 32, "quorum"))

    def remove_source(self, chain_id: int, ledger_address: str):
        """Admin only: stop accepting messages from that source (accepted ones stay recorded)."""
        return self._transact("removeSource", _uint(chain_id, 256, "chain_id"), to_checksum_address(ledger_address))

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
        return bool(self._call("accepted", _digest32(message_id, "message id"))[0])

    def message(self, message_id: bytes | str) -> AcceptedMessage:
        """The stored record of an accepted message; raises :class:`MessageNotAccepted` otherwise."""
        mid = _digest32(message_id, "message id")
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

    def block_number(self) -> int:
        return with_retries(lambda: self.w3.eth.block_number, what="eth_blockNumber", label=self._label)

    def _logs(self, event: str, from_block: int, to_block: int, topics: list | None = None,
              max_range: int = 10_000) -> list:
        ev = self._abi.events[event]
        out = []
        start = from_block
        while start <= to_block:
            end = min(to_block, start + max_range - 1)
            flt = {"address": self.address, "fromBlock": start, "toBlock": end,
                   "topics": ["0x" + ev["topic"].hex(), *(topics or [])]}
            out.extend(with_retries(lambda: self.w3.eth.get_logs(flt), what="eth_getLogs", label=self._label))
            start = end + 1
        return out

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
    art = load_artifact(CONTRACT_NAME)
    _, decoder = _codec()
    receipt = send_transaction(w3, admin_account, {"data": bytes.fromhex(art["bytecode"][2:])},
                               decoder=decoder, contract=f"new {CONTRACT_NAME}", gas_margin=gas_margin)
    client = BridgeClient(w3, receipt["contractAddress"], admin_account, deploy_block=receipt["blockNumber"],
                          gas_margin=gas_margin)
    log.info("deployed %s at %s on %s (block %d, gas %d)", CONTRACT_NAME, client.address, node_label(w3),
             receipt["blockNumber"], receipt["gasUsed"])
    return client


# ====================================================================== receiving
def receive(bridge: BridgeClient, message_id: bytes | str, store: BlobStore | None = None) -> bytes:
    """The payload of the accepted message ``message_id``: inline from the bridge's event, or from
    ``store``; verified against the accepted digest and size.

    Raises :class:`MessageNotAccepted`, :class:`PayloadUnavailable` (not inline and not in
    ``store``) or :class:`ReceivedPayloadMismatch` (the bytes do not hash to the digest).
    """
    rec = bridge.message(message_id)
    inline = bridge.inline_payload(rec.id) if rec.inline else b""
    try:
        data = fetch_payload(rec.digest, inline, store)
    except DigestMismatch as exc:
        raise ReceivedPayloadMismatch(
            f"the payload of message 0x{rec.id.hex()} (from {rec.source_identity}, round "
            f"{rec.source_round}) does not match its accepted digest 0x{rec.digest.hex()}: {exc}; the "
            "copy was tampered with or corrupted — do not use it", details={"id": rec.id}) from None
    except BlobNotFound as exc:
        raise PayloadUnavailable(
            f"the payload of message 0x{rec.id.hex()} is not inline and not in the blob store ({exc}); "
            "the relayer puts it in the destination store: pass that store", details={"id": rec.id}) from None
    if len(data) != rec.payload_size:
        raise ReceivedPayloadMismatch(
            f"the payload of message 0x{rec.id.hex()} has {len(data)} bytes, the accepted message says "
            f"{rec.payload_size}", details={"id": rec.id})
    return data


# ====================================================================== signing members and relayer
SignerLike = Union[bytes, Callable[["BridgeMessage", int, str], bytes]]


class MemberSigner:
    """A member of the source task that signs bridge messages — only for the global model it
    computed itself.

    account: the member's key (its address must be registered as a signer on the bridge).
    global_digests: ``round -> digest of the global model this member computed after that round``
    (a mapping, or a callable returning None when unknown). source_chain_id / source_ledger: the
    member's own task; messages from another source are refused. kinds: message kinds it signs.
    Calling it with ``(message, bridge_chain_id, bridge_address)`` returns the 65-byte signature or
    raises :class:`SignatureRefused`.
    """

    def __init__(self, account: LocalAccount,
                 global_digests: Mapping[int, bytes] | Callable[[int], bytes | None], *,
                 source_chain_id: int | None = None, source_ledger: str | None = None,
                 kinds: Sequence[int] = (KIND_GLOBAL_MODEL,)):
        self.account = account
        self._digests = global_digests
        self.source_chain_id = source_chain_id
        self.source_ledger = to_checksum_address(source_ledger) if source_ledger else None
        self.kinds = tuple(kinds)

    @property
    def address(self) -> str:
        return self.account.address

    def own_digest(self, round: int) -> bytes | None:
        d = self._digests(round) if callable(self._digests) else self._digests.get(round)
        return None if d is None else _digest32(d)

    def __call__(self, message: BridgeMessage, bridge_chain_id: int, bridge_address: str) -> bytes:
        who = self.account.address
        if self.source_chain_id is not None and message.source_chain_id != self.source_chain_id or \
                self.source_ledger is not None and message.source_ledger != self.source_ledger:
            raise SignatureRefused(f"{who} refuses to sign: the message comes from {message.source_identity}, "
                                   f"not from its own task eip155:{self.source_chain_id}:{self.source_ledger}")
        if message.kind not in self.kinds:
            raise SignatureRefused(f"{who} refuses to sign a message of kind {message.kind} "
                                   f"(it signs kinds {self.kinds})")
        own = self.own_digest(message.source_round)
        if own is None:
            raise SignatureRefused(f"{who} refuses to sign: it has no global model of round "
                                   f"{message.source_round} of its own to compare with")
        if own != message.digest:
            raise SignatureRefused(f"{who} refuses to sign: the message's digest {message.digest.hex()[:16]}… "
                                   f"differs from the global model digest {own.hex()[:16]}… it computed "
                                   f"for round {message.source_round}",
                                   details={"own": own, "message": message.digest})
        return sign_message(self.account, message, bridge_chain_id, bridge_address)


@dataclass
class RelayResult:
    """Outcome of :meth:`Relayer.relay`: the accepted message, its id, the receipt, who signed,
    and the refusals met while gathering signatures."""

    id: bytes
    message: BridgeMessage
    receipt: Any
    signers: list[str]
    refusals: list[str]

    @property
    def gas_used(self) -> int:
        return int(self.receipt["gasUsed"])


class Relayer:
    """Carries a source task's global model to a bridge (any party may run it; trust comes from
    the members' signatures).

    source: a :class:`LedgerClient` of the task on chain A (read-only is enough). bridge: a
    :class:`BridgeClient` on chain B acting as the account that pays for the relay. source_store:
    chain A's blob store, where members published the global model (:func:`publish_global_model`).
    dest_store: chain B's blob store, where the relayer copies payloads too large to go inline
    (None: receivers share ``source_store``). max_inline: payloads up to this size travel inline in
    the relay transaction (calldata costs about 40 gas a byte; see contracts/README.md).
    """

    def __init__(self, source: LedgerClient, bridge: BridgeClient, source_store: BlobStore | None = None,
                 dest_store: BlobStore | None = None, *, max_inline: int = 8192, kind: int = KIND_GLOBAL_MODEL):
        if max_inline < 0:
            raise ValueError(f"max_inline must be >= 0, got {max_inline}")
        self.source, self.bridge = source, bridge
        self.source_store, self.dest_store = source_store, dest_store
        self.max_inline, self.kind = int(max_inline), int(kind)
        self._source_chain_id: int | None = None

    @property
    def source_chain_id(self) -> int:
        if self._source_chain_id is None:
            self._source_chain_id = self.source.w3.eth.chain_id
        return self._source_chain_id

    def ready_round(self) -> int | None:
        """The round to relay now: the last round if the task finished, else None."""
        t = self.source.task()
        return t.n_rounds - 1 if t.finished else None

    def _payload(self, digest: bytes) -> bytes:
        try:
            return fetch_payload(digest, b"", self.source_store)
        except BlobNotFound as exc:
            raise PayloadUnavailable(
                f"the global model {digest.hex()[:16]}… attested on {self.source.address} is not in the "
                f"source blob store ({exc}); members publish it with publish_global_model(store, vec, "
                "layout)", details={"digest": digest}) from None
        except DigestMismatch as exc:
            raise ReceivedPayloadMismatch(f"the source blob store holds a corrupted copy of "
                                          f"{digest.hex()[:16]}…: {exc}") from None

    def build_message(self, round: int | None = None) -> BridgeMessage:
        """The message for ``round`` (default: the last round of a finished task): the round's
        majority attested digest, with the payload inline when it is at most ``max_inline`` bytes.
        Raises :class:`NothingToRelay` if the round is not closed or has no attestation."""
        t = self.source.task()
        if round is None:
            if not t.finished:
                raise NothingToRelay(
                    f"the task on ledger {self.source.address} is not finished (round {t.current_round} "
                    f"of {t.n_rounds} open); pass round= for a closed round, or use watch()")
            round = t.n_rounds - 1
        if round >= t.current_round or not t.started:
            raise NothingToRelay(f"round {round} of ledger {self.source.address} is not closed yet "
                                 f"(current round {t.current_round})")
        digest = self.source.majority_digest(round)
        if digest is None:
            raise NothingToRelay(f"no member attested a global model for round {round} of ledger "
                                 f"{self.source.address} yet")
        mismatches = self.source.mismatch_count(round)
        if mismatches:
            log.warning("round %d of %s: %d attestation(s) disagree with the majority digest", round,
                        self.source.address, mismatches)
        payload = self._payload(digest)
        expected_layout = t.params.get("layout_id") if isinstance(t.params, dict) else None
        if self.kind == KIND_GLOBAL_MODEL and expected_layout and payload[:32].hex() != expected_layout:
            raise NothingToRelay(f"the global model payload's layout {payload[:32].hex()[:12]}… is not the "
                                 f"task's layout {str(expected_layout)[:12]}…")
        msg = BridgeMessage(self.source_chain_id, self.source.address, round, digest, self.kind, len(payload))
        return msg.with_payload(payload) if len(payload) <= self.max_inline else msg

    def collect_signatures(self, message: BridgeMessage,
                           signers: Sequence[SignerLike]) -> tuple[list[bytes], list[str], list[str]]:
        """Ask each signer (a callable, or a pre-collected signature) for a signature of ``message``
        for this bridge. Keeps only signatures that recover to a registered signer of the source,
        each signer once. Returns ``(signatures, signer addresses, refusals)``."""
        cid, addr = self.bridge.chain_id, self.bridge.address
        sigs, who, refusals = [], [], []
        for s in signers:
            if isinstance(s, (bytes, bytearray)):
                sig = bytes(s)
            else:
                try:
                    sig = bytes(s(message, cid, addr))
                except SignatureRefused as exc:
                    refusals.append(str(exc))
                    log.warning("bridge relay: %s", exc)
                    continue
            signer = recover_signer(message, sig, cid, addr)
            if signer is None:
                refusals.append("a malformed signature was dropped")
            elif not self.bridge.is_signer(message.source_chain_id, message.source_ledger, signer):
                refusals.append(f"a signature by {signer}, not a registered signer of the source, was dropped")
            elif signer in who:
                refusals.append(f"a second signature by {signer} was dropped")
            else:
                sigs.append(sig)
                who.append(signer)
        return sigs, who, refusals

    def relay(self, signers: Sequence[SignerLike], round: int | None = None) -> RelayResult:
        """Build the message of ``round`` (default: the finished task's last round), gather
        signatures, put the payload in ``dest_store`` unless inline, and submit it to the bridge.
        Raises :class:`BelowQuorum` (nothing sent) if fewer than the source's quorum signed."""
        message = self.build_message(round)
        sigs, who, refusals = self.collect_signatures(message, signers)
        quorum = self.bridge.quorum(message.source_chain_id, message.source_ledger)
        if quorum and len(sigs) < quorum:
            err = _error(BelowQuorum, self.bridge.address, valid=len(sigs), quorum=quorum)
            raise BelowQuorum(f"{err}" + (f" (refusals: {'; '.join(refusals)})" if refusals else ""),
                              details={**err.details, "refusals": refusals})
        if not message.payload and self.dest_store is not None:
            payload = self._payload(message.digest)
            self.dest_store.put(payload)
        receipt = self.bridge.relay(message, sigs)
        log.info("relayed round %d of %s to bridge %s: message %s, %d signature(s), gas %d",
                 message.source_round, message.source_identity, self.bridge.address,
                 message.id().hex()[:16], len(sigs), receipt["gasUsed"])
        return RelayResult(message.id(), message, receipt, who, refusals)

    def watch(self, signers: Sequence[SignerLike], round: int | None = None, *,
              min_attestations: int | None = None, timeout: float = 600.0,
              poll_interval: float = 0.5) -> RelayResult:
        """Wait until the task finished (or ``round`` closed) and its majority digest has
        ``min_attestations`` attestations (default: the source's quorum on the bridge, at least 1),
        then :meth:`relay`. Raises :class:`~medchain.chain.LedgerTimeout` after ``timeout`` s."""
        from medchain.chain.errors import LedgerTimeout
        deadline = time.monotonic() + timeout
        need = min_attestations
        if need is None:
            need = max(1, self.bridge.quorum(self.source_chain_id, self.source.address))
        while True:
            t = self.source.task()
            r = (t.n_rounds - 1 if t.finished else None) if round is None else round
            if r is not None and r < t.current_round and t.started:
                maj = self.source.majority_digest(r)
                if maj is not None:
                    count = sum(a.digest == maj for a in self.source.attestations(r))
                    if count >= need:
                        return self.relay(signers, r)
            if time.monotonic() >= deadline:
                raise LedgerTimeout(f"the task on ledger {self.source.address} had no "
                                    f"{'finished task' if round is None else f'closed round {round}'} with "
                                    f"{need} agreeing attestation(s) within {timeout:.0f} s")
            time.sleep(poll_interval)
