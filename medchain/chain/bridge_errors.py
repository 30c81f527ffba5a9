"""Exceptions of the Bridge client (contracts/Bridge.sol) and of the transfer steps around it.

Each custom error of the contract has a class named after it with a message template
(:data:`BRIDGE_ERRORS`, the bridge's error table, read by :class:`~.errors.RevertDecoder`); all are
:class:`BridgeError`, a :class:`~.errors.LedgerError`. The payload check on receipt
(``ReceivedPayloadMismatch``, also a codec ``DigestMismatch``) lives with :func:`medchain.crosschain.receive`.
"""
from __future__ import annotations

from .errors import LedgerError, ZeroDigest

__all__ = [
    "BridgeError", "NotBridgeAdmin", "InvalidSource", "InvalidQuorum", "InvalidSigner", "RepeatedSigner",
    "UnknownSource", "PayloadSizeMismatch", "PayloadMismatch", "AlreadyAccepted", "MalformedSignature",
    "SignatureWrongLength", "SignatureHighS", "SignatureBadV", "SignatureUnrecoverable", "UnknownSigner",
    "DuplicateSigner", "BelowQuorum", "MessageNotAccepted", "PayloadUnavailable", "SignatureRefused",
    "NothingToRelay", "BRIDGE_ERRORS",
]


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

