"""Messages of the Bridge (contracts/Bridge.sol): what a relayer submits and members sign.

A message is ``(sourceChainId uint256, sourceLedger address, sourceRound uint32, digest bytes32,
kind uint8, payloadSize uint64)`` plus an optional inline payload (bound by ``digest = sha256(payload)``, which the contract checks). Its id is the EIP-712 struct hash

    id = keccak256(abi.encode(MESSAGE_TYPEHASH, sourceChainId, sourceLedger, sourceRound, digest,
                              kind, payloadSize))
    MESSAGE_TYPEHASH = keccak256("Message(uint256 sourceChainId,address sourceLedger,"
                                 "uint32 sourceRound,bytes32 digest,uint8 kind,uint64 payloadSize)")

and members sign (65-byte ``r ‖ s ‖ v``, eth-account, local key) the EIP-712 hash

    keccak256(0x19 0x01 ‖ domainSeparator ‖ id),  domain = EIP712Domain(name "medchain Bridge",
    version "1", chainId = destination chain id, verifyingContract = bridge address)

so a signature is valid on one bridge of one chain only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

from .contract import digest32, uint

__all__ = ["KIND_GLOBAL_MODEL", "DOMAIN_NAME", "DOMAIN_VERSION", "MESSAGE_TYPE", "BridgeMessage",
           "domain_separator", "sign_message", "recover_signer"]

#: Message kind: the global model of a closed round (warm start / L2-SP regularization).
KIND_GLOBAL_MODEL = 1
DOMAIN_NAME = "medchain Bridge"
DOMAIN_VERSION = "1"
MESSAGE_TYPE = ("Message(uint256 sourceChainId,address sourceLedger,uint32 sourceRound,bytes32 digest,"
                "uint8 kind,uint64 payloadSize)")
_MESSAGE_TYPEHASH = keccak(text=MESSAGE_TYPE)
_DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")


def domain_separator(bridge_chain_id: int, bridge_address: str) -> bytes:
    """The EIP-712 domain separator of the bridge at ``bridge_address`` on chain ``bridge_chain_id``."""
    return keccak(abi_encode(
        ["bytes32", "bytes32", "bytes32", "uint256", "address"],
        [_DOMAIN_TYPEHASH, keccak(text=DOMAIN_NAME), keccak(text=DOMAIN_VERSION),
         uint(bridge_chain_id, 256, "bridge chain id"), to_checksum_address(bridge_address)]))


@dataclass(frozen=True)
class BridgeMessage:
    """A message from a source task (chain ``source_chain_id``, ledger ``source_ledger``) to a bridge.

    digest: 32 bytes, sha256 of the payload (for ``kind`` 1, the global-model digest attested on
    the source chain, see :func:`medchain.crosschain.model_payload`). payload_size: bytes of the
    payload. payload: the payload itself when it travels inline (else empty: it travels through a
    blob store). Neither the id nor the signatures cover ``payload``: it is bound by ``digest``.
    """

    source_chain_id: int
    source_ledger: str
    source_round: int
    digest: bytes
    kind: int = KIND_GLOBAL_MODEL
    payload_size: int = 0
    payload: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_chain_id", uint(self.source_chain_id, 256, "source_chain_id"))
        object.__setattr__(self, "source_ledger", to_checksum_address(self.source_ledger))
        object.__setattr__(self, "source_round", uint(self.source_round, 32, "source_round"))
        object.__setattr__(self, "digest", digest32(self.digest))
        object.__setattr__(self, "kind", uint(self.kind, 8, "kind"))
        object.__setattr__(self, "payload_size", uint(self.payload_size, 64, "payload_size"))
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
        if hashlib.sha256(payload).digest() != self.digest or len(payload) != self.payload_size:
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
