"""Attested peer-to-peer transfer between task chains (contracts/Bridge.sol).

One chain per task: a task is identified by its chain id *and* its ledger address
(:func:`medchain.chain.chain_identity`; in-process eth-tester chains all share one chain id). A task
on chain B uses auxiliary information from a similar task on chain A — the global model of a closed
round, for warm start or L2-SP regularization (:mod:`medchain.transfer`) — sent peer to peer:

1. chain B's governance deploys a Bridge (:func:`medchain.chain.deploy_bridge`, client
   :class:`medchain.chain.BridgeClient`, messages :mod:`medchain.chain.bridge_message`) and registers
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

The bridge's refusals and the errors of these steps are in :mod:`medchain.chain.bridge_errors`
(the payload check on receipt, :class:`ReceivedPayloadMismatch`, is here: it is also a codec
``DigestMismatch``).

Example::

    bridge = deploy_bridge(w3_b, governance)
    bridge.register_source(chain_id_a, ledger_a.address, [m.address for m in members_a], quorum=2)
    relayer = Relayer(ledger_a_readonly, bridge.as_account(anyone), source_store, dest_store)
    result = relayer.relay([MemberSigner(m, {r: digest_m}) for m, digest_m in ...])
    payload = receive(bridge, result.id, dest_store)
    w_source = parse_model_payload(payload, source_layout)
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from medchain.blobstore import BlobNotFound, BlobStore, fetch_payload
from medchain.chain.bridge import BridgeClient
from medchain.chain.bridge_errors import (BelowQuorum, BridgeError, NothingToRelay, PayloadUnavailable,
                                          SignatureRefused)
from medchain.chain.bridge_message import KIND_GLOBAL_MODEL, BridgeMessage, recover_signer, sign_message
from medchain.chain.contract import digest32
from medchain.chain.errors import LedgerTimeout, contract_error
from medchain.chain.ledger import LedgerClient
from medchain.codec import DigestMismatch, digest as sha256_digest
from medchain.params import Layout, digest_vector

__all__ = ["model_payload", "parse_model_payload", "publish_global_model", "receive", "MemberSigner",
           "Relayer", "RelayResult", "ReceivedPayloadMismatch"]

log = logging.getLogger("medchain.chain")


class ReceivedPayloadMismatch(BridgeError, DigestMismatch):
    """The payload found for an accepted message does not hash to its digest (or has another size)."""
    reason = "ReceivedPayloadMismatch"


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
        return None if d is None else digest32(d)

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
            err = contract_error(BelowQuorum, self.bridge.address, {"valid": len(sigs), "quorum": quorum})
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
