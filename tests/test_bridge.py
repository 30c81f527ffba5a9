"""Attested peer-to-peer transfer between task chains: the Bridge contract, its client and the
Relayer (medchain.chain.bridge, medchain.crosschain), on two embedded chains and on two real anvil nodes."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eth_account import Account
from eth_account.messages import encode_typed_data
from web3 import Web3

from medchain.blobstore import MemoryBlobStore
from medchain.chain import (LedgerError, LedgerTimeout, ZeroDigest, chain_identity, connect,
                            deploy_ledger, embedded_accounts)
from medchain.chain.anvil import AnvilNotFound, find_anvil, start_nodes
from medchain.chain.bridge import deploy_bridge
from medchain.chain.bridge_errors import (AlreadyAccepted, BelowQuorum, BridgeError, DuplicateSigner, InvalidQuorum,
                                          InvalidSigner, InvalidSource, MalformedSignature, MessageNotAccepted,
                                          NotBridgeAdmin, NothingToRelay, PayloadMismatch, PayloadSizeMismatch,
                                          PayloadUnavailable, RepeatedSigner, SignatureBadV, SignatureHighS,
                                          SignatureRefused, SignatureUnrecoverable, SignatureWrongLength,
                                          UnknownSigner, UnknownSource)
from medchain.chain.bridge_message import KIND_GLOBAL_MODEL, BridgeMessage, recover_signer, sign_message
from medchain.crosschain import (MemberSigner, ReceivedPayloadMismatch, Relayer, parse_model_payload,
                                 publish_global_model, receive)
from medchain.models import build_model
from medchain.params import Layout, digest_vector, model_vector
from medchain.transfer import warm_start

torch.set_num_threads(1)

from conftest import ANVIL_MISSING as _MISSING, needs_anvil  # noqa: E402

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _sha(x: bytes) -> bytes:
    return hashlib.sha256(x).digest()


# ---------------------------------------------------------------------- worlds
def _world(wa, wb, accounts_a, accounts_b) -> SimpleNamespace:
    """Chain A: a 3-member task ledger. Chain B: a bridge whose admin registered chain A's task
    (its 3 members as signers, quorum 2)."""
    admin_a, *members = accounts_a[:4]
    gov, relayer_acct, outsider = accounts_b[5], accounts_b[6], accounts_b[7]
    ledger = deploy_ledger(wa, admin_a, "cnn", _sha(b"init"), 2, {},
                           members=[m.address for m in members], start=True)
    bridge = deploy_bridge(wb, gov)
    bridge.register_source(wa.eth.chain_id, ledger.address, [m.address for m in members], 2)
    return SimpleNamespace(wa=wa, wb=wb, ledger=ledger, members=members, gov=gov, relayer=relayer_acct,
                           outsider=outsider, bridge=bridge, relay=bridge.as_account(relayer_acct),
                           cid_a=wa.eth.chain_id, cid_b=wb.eth.chain_id)


@pytest.fixture(scope="module")
def embedded():
    wa, wb = connect(), connect()          # two separate embedded chains
    return _world(wa, wb, embedded_accounts(wa), embedded_accounts(wb))


def _message(w, round=0, payload=b"", digest=None, **kw) -> BridgeMessage:
    digest = digest if digest is not None else _sha(payload or f"model-{round}".encode())
    return BridgeMessage(kw.pop("chain_id", w.cid_a), kw.pop("ledger", w.ledger.address), round, digest,
                         KIND_GLOBAL_MODEL, kw.pop("size", len(payload) or 1000), payload)


def _sigs(w, msg, who=(0, 1)):
    return [sign_message(w.members[i], msg, w.cid_b, w.bridge.address) for i in who]


def _snapshot(w):
    return (w.wb.eth.block_number, len(w.bridge.messages()))


# ---------------------------------------------------------------------- format
def test_two_embedded_chains_are_separate(embedded):
    w = embedded
    assert w.cid_a == w.cid_b                     # eth-tester: one chain id for every in-process chain
    assert w.wb.eth.get_code(w.ledger.address) != w.wa.eth.get_code(w.ledger.address)
    assert chain_identity(w.wa, w.ledger.address) != chain_identity(w.wb, w.bridge.address)
    assert w.bridge.sources() == [(w.cid_a, w.ledger.address)]
    assert w.bridge.signers(w.cid_a, w.ledger.address) == [m.address for m in w.members]
    assert w.bridge.quorum(w.cid_a, w.ledger.address) == 2
    assert w.bridge.admin() == w.gov.address


def test_message_id_and_signing_hash_match_contract_and_eip712(embedded):
    w = embedded
    msg = _message(w, round=7)
    assert w.bridge.message_id(msg) == msg.id()
    assert w.bridge.signing_hash(msg) == msg.signing_hash(w.cid_b, w.bridge.address)
    typed = encode_typed_data(full_message={
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"},
                             {"name": "verifyingContract", "type": "address"}],
            "Message": [{"name": "sourceChainId", "type": "uint256"}, {"name": "sourceLedger", "type": "address"},
                        {"name": "sourceRound", "type": "uint32"}, {"name": "digest", "type": "bytes32"},
                        {"name": "kind", "type": "uint8"}, {"name": "payloadSize", "type": "uint64"}]},
        "primaryType": "Message",
        "domain": {"name": "medchain Bridge", "version": "1", "chainId": w.cid_b,
                   "verifyingContract": w.bridge.address},
        "message": {"sourceChainId": msg.source_chain_id, "sourceLedger": msg.source_ledger,
                    "sourceRound": 7, "digest": msg.digest, "kind": 1, "payloadSize": msg.payload_size}})
    assert typed == msg.signable(w.cid_b, w.bridge.address)
    sig = sign_message(w.members[0], msg, w.cid_b, w.bridge.address)
    assert len(sig) == 65 and sig[64] in (27, 28)
    assert recover_signer(msg, sig, w.cid_b, w.bridge.address) == w.members[0].address
    # the payload is not part of the id: the same message inline or via a blob store
    inline = _message(w, round=7, payload=b"p" * 1000)
    assert inline.id() == inline.without_payload().id()


# ---------------------------------------------------------------------- acceptance
def test_accept_with_quorum_2_of_3(embedded):
    w = embedded
    payload = b"global model bytes" * 10
    msg = _message(w, round=1, payload=payload)
    before = len(w.bridge.messages())
    receipt = w.relay.relay(msg, _sigs(w, msg, (2, 0)))        # any 2 of 3, any order
    assert receipt["status"] == 1
    assert w.bridge.accepted(msg.id())
    rec = w.bridge.message(msg.id())
    assert (rec.source_chain_id, rec.source_ledger, rec.source_round, rec.digest, rec.kind) == \
        (w.cid_a, w.ledger.address, 1, _sha(payload), KIND_GLOBAL_MODEL)
    assert rec.inline and rec.payload_size == len(payload) and rec.signer_count == 2
    msgs = w.bridge.messages()
    assert len(msgs) == before + 1
    last = msgs[-1]
    assert last.id == msg.id() and last.relayer == w.relayer.address
    assert last.signers == (w.members[2].address, w.members[0].address)
    assert receive(w.bridge, msg.id()) == payload        # inline: no store needed
    # all three signers work too
    msg3 = _message(w, round=2)
    w.relay.relay(msg3, _sigs(w, msg3, (0, 1, 2)))
    assert w.bridge.message(msg3.id()).signer_count == 3


# ---------------------------------------------------------------------- rejections
def _high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    v = 27 + (1 - (sig[64] - 27))
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([v])


REJECTIONS = [
    # (case, exception, message fragment)
    ("forged", UnknownSigner, "not a registered signer"),
    ("below_quorum", BelowQuorum, "quorum on bridge"),
    ("no_signature", BelowQuorum, "only 0 valid signature"),
    ("duplicate", DuplicateSigner, "each signer counts once"),
    ("unknown_ledger", UnknownSource, "no registered source"),
    ("unknown_chain", UnknownSource, "no registered source for chain 1,"),
    ("other_bridge", UnknownSigner, "another bridge or chain id"),
    ("other_chain_id", UnknownSigner, "another bridge or chain id"),
    ("tampered_message", UnknownSigner, "tampered message"),
    ("short_signature", SignatureWrongLength, "64 bytes, expected 65"),
    ("high_s", SignatureHighS, "upper half"),
    ("bad_v", SignatureBadV, "v = 29"),
    ("unrecoverable", SignatureUnrecoverable, "no signer can be recovered"),
    ("tampered_inline_payload", PayloadMismatch, "does not match the message digest"),
    ("inline_size", PayloadSizeMismatch, "announces payloadSize"),
    ("zero_digest", ZeroDigest, "all zeros"),
]


def _rejected_relay(w, case):
    """(message, signatures) of a relay that must be refused."""
    msg = _message(w, round=11)
    ok = _sigs(w, msg)
    if case == "forged":
        return msg, [ok[0], sign_message(w.outsider, msg, w.cid_b, w.bridge.address)]
    if case == "below_quorum":
        return msg, ok[:1]
    if case == "no_signature":
        return msg, []
    if case == "duplicate":
        return msg, [ok[0], ok[0]]
    if case == "unknown_ledger":
        other = _message(w, round=11, ledger="0x" + "ab" * 20)
        return other, _sigs(w, other)
    if case == "unknown_chain":
        other = _message(w, round=11, chain_id=1)
        return other, _sigs(w, other)
    if case == "other_bridge":
        fake = "0x" + "cd" * 20
        return msg, [ok[0], sign_message(w.members[1], msg, w.cid_b, fake)]
    if case == "other_chain_id":
        return msg, [ok[0], sign_message(w.members[1], msg, w.cid_b + 1, w.bridge.address)]
    if case == "tampered_message":
        t = _message(w, round=11, digest=_sha(b"another model"))
        return t, ok
    if case == "short_signature":
        return msg, [ok[0], ok[1][:64]]
    if case == "high_s":
        return msg, [ok[0], _high_s(ok[1])]
    if case == "bad_v":
        return msg, [ok[0], ok[1][:64] + bytes([29])]
    if case == "unrecoverable":
        return msg, [ok[0], bytes(32) + ok[1][32:]]
    if case == "tampered_inline_payload":
        good = _message(w, round=11, payload=b"A" * 100)
        bad = BridgeMessage(good.source_chain_id, good.source_ledger, 11, good.digest, 1, 100, b"B" * 100)
        return bad, _sigs(w, bad)
    if case == "inline_size":
        good = _message(w, round=11, payload=b"A" * 100)
        bad = BridgeMessage(good.source_chain_id, good.source_ledger, 11, good.digest, 1, 99, b"A" * 100)
        return bad, _sigs(w, bad)
    if case == "zero_digest":
        z = _message(w, round=11, digest=bytes(32))
        return z, _sigs(w, z)
    raise AssertionError(case)


@pytest.mark.parametrize("case, exc, fragment", REJECTIONS, ids=[c for c, _, _ in REJECTIONS])
def test_rejected_relay_raises_specific_error_and_changes_nothing(embedded, case, exc, fragment):
    w = embedded
    msg, sigs = _rejected_relay(w, case)
    before = _snapshot(w)
    with pytest.raises(exc, match=fragment) as info:
        w.relay.relay(msg, sigs)
    assert isinstance(info.value, LedgerError)
    if exc in (SignatureWrongLength, SignatureHighS, SignatureBadV, SignatureUnrecoverable):
        assert isinstance(info.value, MalformedSignature) and info.value.details["index"] == 1
    assert _snapshot(w) == before                  # nothing sent, nothing recorded
    assert not w.bridge.accepted(msg.id())


def test_replay_is_refused(embedded):
    w = embedded
    msg = _message(w, round=21)
    sigs = _sigs(w, msg)
    w.relay.relay(msg, sigs)
    before = _snapshot(w)
    for again in (msg, msg.without_payload()):
        with pytest.raises(AlreadyAccepted, match="replay refused") as info:
            w.relay.relay(again, sigs)
        assert info.value.details["id"] == msg.id()
        assert f"message 0x{msg.id().hex()} was already accepted" in str(info.value)  # bytes as hex
    # the same signatures by other members, or by a third party relaying: still the same message
    with pytest.raises(AlreadyAccepted):
        w.bridge.as_account(w.outsider).relay(msg, _sigs(w, msg, (1, 2)))
    assert _snapshot(w) == before


def test_both_clients_share_one_base_and_keep_their_own_errors(embedded):
    """Ledger and bridge clients are one ContractClient each: a read-only client refuses to send,
    naming its class; an address without code raises the client's own error family."""
    from medchain.chain import LedgerClient
    from medchain.chain.bridge import BridgeClient
    from medchain.chain.contract import ContractClient

    w = embedded
    read_only = w.bridge.as_account(None)
    assert isinstance(read_only, ContractClient) and isinstance(w.ledger, ContractClient)
    assert read_only.account is None and w.bridge.account is w.gov and read_only.address == w.bridge.address
    with pytest.raises(ValueError, match=r"create the BridgeClient with an account"):
        read_only.remove_source(w.cid_a, w.ledger.address)
    with pytest.raises(ValueError, match=r"create the LedgerClient with an account"):
        w.ledger.as_account(None).start()
    nowhere = w.outsider.address                    # an account, not a contract
    with pytest.raises(BridgeError, match="no contract code") as info:
        BridgeClient(w.wb, nowhere).admin()
    assert info.value.reason == "NoContract"
    with pytest.raises(LedgerError, match="no contract code") as info:
        LedgerClient(w.wb, nowhere).admin()
    assert not isinstance(info.value, BridgeError) and info.value.reason == "NoContract"


def test_mined_rejection_is_decoded(embedded):
    """With an explicit gas limit the simulation is skipped: the revert is mined and decoded."""
    w = embedded
    msg = _message(w, round=31)
    with pytest.raises(BelowQuorum) as info:
        w.relay.relay(msg, _sigs(w, msg)[:1], gas=300_000)
    assert info.value.tx_hash and w.wb.eth.get_transaction_receipt(info.value.tx_hash)["status"] == 0
    assert not w.bridge.accepted(msg.id())


def test_governance_rules(embedded):
    w = embedded
    m = [x.address for x in w.members]
    before = _snapshot(w)
    cases = [
        (w.bridge.as_account(w.outsider), (w.cid_a, w.ledger.address, m, 2), NotBridgeAdmin, "not the admin"),
        (w.bridge, (w.cid_a, w.ledger.address, m, 4), InvalidQuorum, "quorum 4 is invalid for 3"),
        (w.bridge, (w.cid_a, w.ledger.address, m, 0), InvalidQuorum, "at least 1"),
        (w.bridge, (w.cid_a, w.ledger.address, [m[0], m[0]], 1), RepeatedSigner, "listed twice"),
        (w.bridge, (w.cid_a, w.ledger.address, [m[0], "0x" + "00" * 20], 1), InvalidSigner, "zero address"),
        (w.bridge, (w.cid_a, "0x" + "00" * 20, m, 1), InvalidSource, "non-zero"),
        (w.bridge, (0, w.ledger.address, m, 1), InvalidSource, "non-zero"),
    ]
    for client, args, exc, fragment in cases:
        with pytest.raises(exc, match=fragment):
            client.register_source(*args)
    with pytest.raises(UnknownSource):
        w.bridge.remove_source(w.cid_a, "0x" + "ab" * 20)
    assert _snapshot(w) == before
    assert w.bridge.signers(w.cid_a, w.ledger.address) == m


def test_register_replace_and_remove_source():
    wa, wb = connect(), connect()
    w = _world(wa, wb, embedded_accounts(wa), embedded_accounts(wb))
    other = Web3.to_checksum_address("0x" + "ef" * 20)
    w.bridge.register_source(7, other, [w.members[0].address], 1)
    assert w.bridge.sources() == [(w.cid_a, w.ledger.address), (7, other)]
    # replacing the signer set: the old signers no longer count
    w.bridge.register_source(w.cid_a, w.ledger.address, [w.members[2].address, w.outsider.address], 2)
    msg = _message(w, round=0)
    with pytest.raises(UnknownSigner):
        w.relay.relay(msg, _sigs(w, msg, (0, 2)))
    w.relay.relay(msg, [_sigs(w, msg, (2,))[0], sign_message(w.outsider, msg, w.cid_b, w.bridge.address)])
    w.bridge.remove_source(w.cid_a, w.ledger.address)
    assert w.bridge.sources() == [(7, other)] and w.bridge.quorum(w.cid_a, w.ledger.address) == 0
    msg2 = _message(w, round=1)
    with pytest.raises(UnknownSource):
        w.relay.relay(msg2, _sigs(w, msg2, (2,)))
    assert w.bridge.accepted(msg.id())          # accepted messages stay recorded


# ---------------------------------------------------------------------- receiving
def test_receive_verifies_the_payload(embedded):
    w = embedded
    payload = bytes(range(256)) * 40
    msg = _message(w, round=41, payload=payload).without_payload()
    store = MemoryBlobStore()
    w.relay.relay(msg, _sigs(w, msg))
    with pytest.raises(PayloadUnavailable, match="not inline and not in the blob store"):
        receive(w.bridge, msg.id(), store)
    store.put(payload)
    assert receive(w.bridge, msg.id(), store) == payload
    store._blobs[msg.digest] = payload[:-1] + b"\x00"          # tampered copy at the receiver
    with pytest.raises(ReceivedPayloadMismatch, match="does not match its accepted digest") as info:
        receive(w.bridge, msg.id(), store)
    assert isinstance(info.value, BridgeError)
    with pytest.raises(MessageNotAccepted, match="has not accepted"):
        receive(w.bridge, _message(w, round=999).id(), store)


# ---------------------------------------------------------------------- relayer
def _run_source_task(ledger, members, store, *, width=4, n_rounds=2, disagree=None):
    """Run ``n_rounds`` rounds on chain A's ledger with synthetic updates; every member attests the
    digest of the global model it computed (member ``disagree`` computes another one in the last
    round); the members publish the global model in ``store``. Returns (layout, final vector,
    per-member signers' digests)."""
    model = build_model("cnn", 1, 2, seed=0, width=width)
    layout = Layout.from_module(model)
    vec = model_vector(model, layout)
    rng = np.random.default_rng(0)
    own = {m.address: {} for m in members}
    for r in range(n_rounds):
        for i, m in enumerate(members):
            ledger.as_account(m).submit_update(r, _sha(f"{r}/{i}".encode()), 1, 10 + i)
        vec = (vec + 0.01 * rng.standard_normal(layout.size)).astype(np.float32)
        for i, m in enumerate(members):
            mine = vec
            if disagree == i and r == n_rounds - 1:
                mine = (vec + 1).astype(np.float32)
            d = digest_vector(mine, layout)
            own[m.address][r] = d
            ledger.as_account(m).attest(r, d)
        publish_global_model(store, vec, layout)
    return layout, vec, own


def _relayer_end_to_end(wa, wb, accounts_a, accounts_b):
    admin_a, *members = accounts_a[:4]
    gov, relayer_acct = accounts_b[5], accounts_b[6]
    model = build_model("cnn", 1, 2, seed=0, width=4)
    layout = Layout.from_module(model)
    ledger = deploy_ledger(wa, admin_a, "cnn", digest_vector(model_vector(model, layout), layout), 2,
                           {"layout_id": layout.layout_id_hex}, members=[m.address for m in members],
                           start=True)
    bridge = deploy_bridge(wb, gov)
    bridge.register_source(wa.eth.chain_id, ledger.address, [m.address for m in members], 2)
    store_a, store_b = MemoryBlobStore("a"), MemoryBlobStore("b")
    relayer = Relayer(ledger.as_account(None), bridge.as_account(relayer_acct), store_a, store_b,
                      max_inline=1024)
    with pytest.raises(NothingToRelay, match="not finished"):
        relayer.build_message()
    with pytest.raises(LedgerTimeout):
        relayer.watch([], timeout=0.2, poll_interval=0.05)

    layout, vec, own = _run_source_task(ledger, members, store_a, disagree=2)
    assert ledger.finished() and ledger.mismatch_count(1) == 1
    signers = [MemberSigner(m, own[m.address], source_chain_id=wa.eth.chain_id, source_ledger=ledger.address)
               for m in members]
    msg = relayer.build_message()
    assert msg.digest == digest_vector(vec, layout) == ledger.majority_digest(1)
    assert not msg.payload and msg.payload_size == 32 + 4 * layout.size > 1024   # via the blob store
    with pytest.raises(SignatureRefused, match="differs from the global model digest"):
        signers[2](msg, bridge.chain_id, bridge.address)
    # one willing member is below the quorum: refused before anything is sent
    block = wb.eth.block_number
    with pytest.raises(BelowQuorum, match="refusals"):
        relayer.relay(signers[1:])
    assert wb.eth.block_number == block and not bridge.accepted(msg.id())

    result = relayer.watch(signers, timeout=30)     # finished: relays at once; member 2 refuses
    assert result.id == msg.id() and result.signers == [members[0].address, members[1].address]
    assert len(result.refusals) == 1 and "refuses" in result.refusals[0]
    assert bridge.accepted(msg.id())
    payload = receive(bridge, result.id, store_b)           # chain B's store got the copy
    received = parse_model_payload(payload, layout)
    assert np.array_equal(received, vec)
    target = build_model("cnn", 1, 3, seed=9, width=4)
    copied = warm_start(target, received, layout)
    assert copied and not any(n.startswith("head.") for n in copied)

    # an earlier, closed round travels inline when small enough; pre-collected signatures work
    small = Relayer(ledger, bridge.as_account(relayer_acct), store_a, None, max_inline=10 ** 6)
    m0 = small.build_message(0)
    assert m0.payload and m0.source_round == 0
    sigs = [sign_message(m, m0, bridge.chain_id, bridge.address) for m in members[:2]]
    r0 = small.relay(sigs + [sigs[0]], round=0)          # the duplicate is dropped client-side
    assert any("second signature" in x for x in r0.refusals)
    assert np.array_equal(parse_model_payload(receive(bridge, r0.id), layout).shape, vec.shape)
    with pytest.raises(AlreadyAccepted):
        relayer.relay(signers)
    assert [m.id for m in bridge.messages()] == [msg.id(), m0.id()]
    return result


def test_relayer_end_to_end_embedded():
    wa, wb = connect(), connect()
    result = _relayer_end_to_end(wa, wb, embedded_accounts(wa), embedded_accounts(wb))
    assert 0 < result.gas_used < 250_000


# ---------------------------------------------------------------------- real nodes
@pytest.mark.anvil
@needs_anvil
def test_two_anvil_chains():
    nodes = start_nodes(2, base_chain_id=7201)
    try:
        wa, wb = connect(nodes[0].url), connect(nodes[1].url)
        assert (wa.eth.chain_id, wb.eth.chain_id) == (7201, 7202)
        keys_a = [Account.from_key(k) for k in nodes[0].dev_keys]
        keys_b = [Account.from_key(k) for k in nodes[1].dev_keys]
        _relayer_end_to_end(wa, wb, keys_a, keys_b)

        w = _world(wa, wb, keys_a, keys_b)
        msg = _message(w, round=3)
        for case, exc, fragment in REJECTIONS:
            bad_msg, bad_sigs = _rejected_relay(w, case)
            before = _snapshot(w)
            with pytest.raises(exc, match=fragment):
                w.relay.relay(bad_msg, bad_sigs)
            assert _snapshot(w) == before, case
        # a signature for the same bridge address on the other chain id is refused
        sig_a = sign_message(w.members[1], msg, 7201, w.bridge.address)
        with pytest.raises(UnknownSigner):
            w.relay.relay(msg, [_sigs(w, msg)[0], sig_a])
        receipt = w.relay.relay(msg, _sigs(w, msg))
        assert receipt["status"] == 1 and w.bridge.accepted(msg.id())
        with pytest.raises(AlreadyAccepted):
            w.relay.relay(msg, _sigs(w, msg))
        with pytest.raises(BelowQuorum):   # mined revert decoded on a real node too
            w.relay.relay(_message(w, round=4), _sigs(w, _message(w, round=4))[:1], gas=300_000)
    finally:
        for n in nodes:
            n.stop()
