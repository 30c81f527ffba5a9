"""The TaskLedger contract and its Python client, on the embedded eth-tester chain."""
from __future__ import annotations

import hashlib
import os

import pytest

from medchain.chain import (AlreadyAttested, AlreadyMember, AlreadyStarted, AlreadySubmitted,
                            DeadlineNotPassed, FutureRound, LedgerClient, LedgerError, NoDeadline,
                            NotAdmin, NotAMember, NotStarted, PayloadTooLarge, QuorumNotReached,
                            RoundClosed, RoundNotClosed, TaskFinished, ZeroDigest, advance_blocks,
                            chain_identity, connect, deploy_ledger, embedded_accounts,
                            final_block_hash, key_from_env)
from medchain.chain.errors import RevertDecoder
from medchain.chain.artifacts import load_artifact

INIT = hashlib.sha256(b"initial model").digest()
PARAMS = {"theta_u": 0.1, "gamma": 0.01, "aggregation": "fedavg"}


def _upd(tag: str, size: int = 64) -> tuple[bytes, bytes]:
    payload = hashlib.sha256(tag.encode()).digest() * (size // 32 + 1)
    payload = payload[:size]
    return hashlib.sha256(payload).digest(), payload


@pytest.fixture()
def chain():
    w3 = connect()
    accts = embedded_accounts(w3)
    return w3, accts


def _ledger(chain, n_rounds=3, n_members=3, start=True, **kw):
    w3, accts = chain
    admin, members, outsider = accts[0], accts[1:1 + n_members], accts[9]
    ledger = deploy_ledger(w3, admin, "cnn-small", INIT, n_rounds, PARAMS,
                           members=[m.address for m in members], start=start, **kw)
    clients = [ledger.as_account(m) for m in members]
    return ledger, clients, ledger.as_account(outsider)


def _snapshot(ledger: LedgerClient) -> tuple:
    t = ledger.task()
    r = min(t.current_round, t.n_rounds - 1)
    return (t.started, t.finished, t.current_round, tuple(ledger.members()),
            tuple(ledger.submitted_count(i) for i in range(r + 1)),
            tuple(len(ledger.updates(i)) for i in range(r + 1)))


def test_happy_path_three_rounds(chain):
    w3, _ = chain
    ledger, clients, _ = _ledger(chain)
    t = ledger.task()
    assert (t.model_arch, t.initial_model_digest, t.n_rounds, t.params, t.quorum) == \
        ("cnn-small", INIT, 3, PARAMS, 1)
    assert t.params_json == '{"aggregation":"fedavg","gamma":0.01,"theta_u":0.1}'
    assert t.started and not t.finished and t.current_round == 0
    assert ledger.members() == [c.account.address for c in clients]
    assert ledger.round_open_block(0) > 0

    for r in range(3):
        assert ledger.current_round() == r
        sent = []
        for i, c in enumerate(clients):
            d, p = _upd(f"r{r}m{i}", 100 + i)
            c.submit_update(r, d, n_values=10 + i, n_samples=50 * (i + 1), payload=p)
            sent.append((c.account.address, d, p, 10 + i, 50 * (i + 1)))
            assert ledger.has_submitted(r, c.account.address)
        # the last update closed the round and opened the next one in the same block
        assert ledger.round_close_block(r) > 0
        if r < 2:
            assert ledger.round_open_block(r + 1) == ledger.round_close_block(r)
        ups = ledger.updates(r)
        assert [(u.sender, u.digest, u.payload, u.n_values, u.n_samples) for u in ups] == sent
        assert all(u.round == r for u in ups)
        assert ledger.submitted_count(r) == 3
        g = hashlib.sha256(f"global{r}".encode()).digest()
        for c in clients:
            c.attest(r, g)
        assert ledger.majority_digest(r) == g and ledger.mismatch_count(r) == 0
        assert [a.digest for a in ledger.attestations(r)] == [g] * 3
    t = ledger.task()
    assert t.finished and t.current_round == 3
    assert [ri.submitted for ri in ledger.rounds()] == [3, 3, 3]
    ident = chain_identity(w3, ledger.address)
    assert ident == f"eip155:{w3.eth.chain_id}:{ledger.address}"
    assert final_block_hash(w3).startswith("0x") and len(final_block_hash(w3)) == 66
    assert ledger.wait_round_closed(2, timeout=1) == ledger.round_close_block(2)


def _rejects(ledger, exc_type, fn, match: str):
    before = _snapshot(ledger)
    with pytest.raises(exc_type, match=match) as info:
        fn()
    assert isinstance(info.value, LedgerError) and info.value.reason == exc_type.__name__
    assert _snapshot(ledger) == before
    return info.value


def test_rejections_leave_state_unchanged(chain):
    ledger, clients, outsider = _ledger(chain, n_rounds=2, start=False)
    d, p = _upd("x")
    _rejects(ledger, NotStarted, lambda: clients[0].submit_update(0, d, 1, 1, p), "not been started")
    _rejects(ledger, NotAdmin, lambda: clients[0].start(), "not the admin")
    ledger.start()
    _rejects(ledger, AlreadyStarted, lambda: ledger.start(), "already started")
    e = _rejects(ledger, NotAMember, lambda: outsider.submit_update(0, d, 1, 1, p), "not an active member")
    assert e.details["caller"] == outsider.account.address
    _rejects(ledger, NotAdmin, lambda: clients[0].add_member(outsider.account.address), "only the admin")
    _rejects(ledger, NotAdmin, lambda: clients[0].remove_member(clients[1].account.address), "not the admin")
    _rejects(ledger, AlreadyMember, lambda: ledger.add_member(clients[1].account.address), "already a member")
    _rejects(ledger, NotAMember, lambda: ledger.remove_member(outsider.account.address), "not an active member")
    _rejects(ledger, ZeroDigest, lambda: clients[0].submit_update(0, bytes(32), 1, 1, p), "all zeros")
    e = _rejects(ledger, FutureRound, lambda: clients[0].submit_update(1, d, 1, 1, p), "round 1 is not open")
    assert e.details == {"round": 1, "currentRound": 0}
    _rejects(ledger, RoundNotClosed, lambda: clients[0].attest(0, d), "not closed yet")

    clients[0].submit_update(0, d, 1, 1, p)
    e = _rejects(ledger, AlreadySubmitted, lambda: clients[0].submit_update(0, d, 1, 1, p), "already submitted")
    assert e.details["member"] == clients[0].account.address and e.tx_hash is None  # nothing was sent
    clients[1].submit_update(0, d, 1, 1, p)
    clients[2].submit_update(0, d, 1, 1, p)
    assert ledger.current_round() == 1
    _rejects(ledger, RoundClosed, lambda: clients[0].submit_update(0, d, 1, 1, p), "already closed")
    _rejects(ledger, NoDeadline, lambda: clients[0].close_round(), "no round deadline")
    clients[0].attest(0, d)
    _rejects(ledger, AlreadyAttested, lambda: clients[0].attest(0, d), "already attested")
    _rejects(ledger, NotAMember, lambda: outsider.attest(0, d), "not an active member")
    for c in clients:
        c.submit_update(1, d, 1, 1, p)
    assert ledger.finished()
    _rejects(ledger, TaskFinished, lambda: clients[0].submit_update(2, d, 1, 1, p), "finished")
    _rejects(ledger, TaskFinished, lambda: clients[0].submit_update(1, d, 1, 1, p), "finished")


def test_mined_revert_is_decoded_and_changes_nothing(chain):
    """With an explicit gas limit the preflight is skipped: the tx is mined, reverts, and the
    client recovers the reason by replay."""
    w3, _ = chain
    ledger, clients, outsider = _ledger(chain)
    d, p = _upd("a")
    clients[0].submit_update(0, d, 1, 1, p)
    before = _snapshot(ledger)
    block = w3.eth.block_number
    with pytest.raises(AlreadySubmitted, match="already submitted") as info:
        clients[0].submit_update(0, d, 1, 1, p, gas=300_000)
    assert info.value.tx_hash and w3.eth.block_number == block + 1  # it was mined
    assert w3.eth.get_transaction_receipt(info.value.tx_hash)["status"] == 0
    with pytest.raises(NotAMember):
        outsider.submit_update(0, d, 1, 1, p, gas=300_000)
    assert _snapshot(ledger) == before


def test_attestation_mismatch_recorded_and_flagged(chain):
    w3, _ = chain
    ledger, clients, _ = _ledger(chain, n_rounds=1, n_members=4)
    for i, c in enumerate(clients):
        c.submit_update(0, *_upd(f"m{i}")[:1], 1, 1)
    good, bad = hashlib.sha256(b"good").digest(), hashlib.sha256(b"bad").digest()
    clients[0].attest(0, good)
    receipt = clients[1].attest(0, bad)  # disagrees: recorded, not rejected
    ev = ledger.w3.eth.contract(address=ledger.address, abi=load_artifact("TaskLedger")["abi"]).events
    from web3.logs import DISCARD
    flagged = ev.AttestationMismatch().process_receipt(receipt, errors=DISCARD)
    assert len(flagged) == 1
    assert flagged[0]["args"]["member"] == clients[1].account.address
    assert flagged[0]["args"]["digest"] == bad and flagged[0]["args"]["majorityDigest"] == good
    clients[2].attest(0, good)
    clients[3].attest(0, good)
    assert ledger.mismatch_count(0) == 1
    assert ledger.majority_digest(0) == good
    atts = ledger.attestations(0)
    assert [(a.member, a.digest, a.agrees) for a in atts] == [
        (clients[0].account.address, good, True), (clients[1].account.address, bad, False),
        (clients[2].account.address, good, True), (clients[3].account.address, good, True)]


def test_majority_switches_when_overtaken(chain):
    ledger, clients, _ = _ledger(chain, n_rounds=1, n_members=3)
    for i, c in enumerate(clients):
        c.submit_update(0, _upd(f"m{i}")[0], 1, 1)
    a, b = b"\xaa" * 32, b"\xbb" * 32
    clients[0].attest(0, a)
    clients[1].attest(0, b)      # tie 1:1, the earlier digest leads
    assert ledger.majority_digest(0) == a
    clients[2].attest(0, b)      # b overtakes
    assert ledger.majority_digest(0) == b
    assert ledger.mismatch_count(0) == 2  # both b attestations disagreed with the leader at the time


def test_deadline_and_quorum_close(chain):
    w3, _ = chain
    ledger, clients, outsider = _ledger(chain, n_rounds=2, deadline_blocks=5, quorum=2)
    d0, d1 = _upd("a")[0], _upd("b")[0]
    opened = ledger.round_open_block(0)
    assert ledger.round_deadline_block(0) == opened + 5
    clients[0].submit_update(0, d0, 1, 1)
    e = _rejects(ledger, DeadlineNotPassed, lambda: outsider.close_round(), "before its deadline")
    assert e.details["deadlineBlock"] == opened + 5
    advance_blocks(w3, 5)
    _rejects(ledger, QuorumNotReached, lambda: outsider.close_round(), "fewer than the quorum of 2")
    clients[1].submit_update(0, d1, 1, 1)  # late updates are accepted until the round is closed
    outsider.close_round()                 # anyone may close it (not only members)
    assert ledger.current_round() == 1
    assert ledger.round_close_block(0) == w3.eth.block_number
    assert [u.sender for u in ledger.updates(0)] == [clients[0].account.address, clients[1].account.address]
    _rejects(ledger, RoundClosed, lambda: clients[2].submit_update(0, d0, 1, 1), "already closed")
    # the next round counts its deadline from its own open block
    assert ledger.round_deadline_block(1) == ledger.round_open_block(1) + 5
    for c in clients:
        c.submit_update(1, d0, 1, 1)
    assert ledger.finished()


def test_remove_member_mid_round_closes_when_rest_submitted(chain):
    ledger, clients, outsider = _ledger(chain, n_rounds=2)
    d = _upd("x")[0]
    clients[0].submit_update(0, d, 1, 1)
    clients[1].submit_update(0, d, 1, 1)
    ledger.remove_member(clients[2].account.address)
    assert ledger.current_round() == 1 and ledger.round_close_block(0) > 0
    assert ledger.members() == [clients[0].account.address, clients[1].account.address]
    _rejects(ledger, NotAMember, lambda: clients[2].submit_update(1, d, 1, 1), "not an active member")
    # removing and re-adding a member who already submitted keeps that update counted
    clients[0].submit_update(1, d, 1, 1)
    ledger.remove_member(clients[0].account.address)
    ledger.add_member(clients[0].account.address)
    assert ledger.current_round() == 1
    clients[1].submit_update(1, d, 1, 1)
    assert ledger.finished()


def test_updates_in_chain_order_within_a_block(chain):
    """Several updates mined in one block come back in log order (the chain's total order)."""
    w3, _ = chain
    ledger, clients, _ = _ledger(chain, n_rounds=1, n_members=3)
    tester = w3.provider.ethereum_tester
    tester.disable_auto_mine_transactions()
    order = [2, 0, 1]
    hashes = [clients[i].submit_update(0, _upd(f"m{i}")[0], i, i + 1, wait=False) for i in order]
    tester.enable_auto_mine_transactions()  # mines the pending transactions in one block
    for h in hashes:
        ledger.wait_for_receipt(h)
    ups = ledger.updates(0)
    assert [u.sender for u in ups] == [clients[i].account.address for i in order]
    assert len({u.block_number for u in ups}) == 1
    assert [u.log_index for u in ups] == sorted(u.log_index for u in ups)
    assert ledger.finished()


def test_large_payload_and_digest_only(chain):
    w3, _ = chain
    ledger, clients, _ = _ledger(chain, n_rounds=1, n_members=2)
    big = os.urandom(100_000)
    receipt = clients[0].submit_update(0, hashlib.sha256(big).digest(), 25_000, 128, big)
    assert receipt["gasUsed"] > 21000 + 16 * 100_000 * 0.9  # calldata floor is charged
    clients[1].submit_update(0, hashlib.sha256(b"blob").digest(), 10, 10)  # payload in the blob store
    ups = ledger.updates(0)
    assert ups[0].payload == big and ups[0].payload_size == 100_000
    assert ups[1].payload == b"" and ups[1].digest == hashlib.sha256(b"blob").digest()


def test_payload_too_large_for_a_block(chain):
    ledger, clients, _ = _ledger(chain, n_rounds=1, n_members=2)
    huge = bytes(range(256)) * 3_000  # 768 KB: more calldata-floor gas than a 30M block holds
    before = _snapshot(ledger)
    with pytest.raises(PayloadTooLarge, match="blob store"):
        clients[0].submit_update(0, hashlib.sha256(huge).digest(), 1, 1, huge)
    assert _snapshot(ledger) == before


def test_client_argument_validation(chain):
    ledger, clients, _ = _ledger(chain, n_rounds=1)
    with pytest.raises(ValueError, match="32 bytes"):
        clients[0].submit_update(0, b"short", 1, 1)
    with pytest.raises(ValueError, match=r"2\*\*32"):
        clients[0].submit_update(-1, b"\x01" * 32, 1, 1)
    with pytest.raises(ValueError, match="account"):
        LedgerClient(ledger.w3, ledger.address).start()
    with pytest.raises(ValueError, match="n_rounds"):
        deploy_ledger(ledger.w3, ledger.account, "x", INIT, 0)


def test_unfunded_account_is_a_clear_error(chain):
    from eth_account import Account
    from medchain.chain import InsufficientFunds, derived_account, fund
    ledger, clients, _ = _ledger(chain, n_rounds=1)
    poor = derived_account("test-poor", 0)
    ledger.add_member(poor.address)
    with pytest.raises(InsufficientFunds, match="cannot pay for gas"):
        ledger.as_account(poor).submit_update(0, b"\x01" * 32, 1, 1)
    fund(ledger.w3, ledger.account, poor.address, 10 ** 18)
    ledger.as_account(poor).submit_update(0, b"\x01" * 32, 1, 1)
    assert isinstance(poor, type(Account.from_key(b"\x01" * 32)))


def test_key_from_env(monkeypatch):
    monkeypatch.delenv("MEDCHAIN_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="MEDCHAIN_TEST_KEY is not set"):
        key_from_env("MEDCHAIN_TEST_KEY")
    monkeypatch.setenv("MEDCHAIN_TEST_KEY", "0xnothex")
    with pytest.raises(ValueError, match="valid private key") as info:
        key_from_env("MEDCHAIN_TEST_KEY")
    assert "nothex" not in str(info.value)
    key = "0x" + "11" * 32
    monkeypatch.setenv("MEDCHAIN_TEST_KEY", key)
    acct = key_from_env("MEDCHAIN_TEST_KEY")
    assert acct.address.startswith("0x") and "11" * 32 not in repr(acct)


def test_revert_decoder_standard_errors():
    dec = RevertDecoder(load_artifact("TaskLedger")["abi"])
    from eth_abi import encode
    from eth_utils import keccak
    e = dec.decode(keccak(text="Error(string)")[:4] + encode(["string"], ["nope"]), contract="C")
    assert "reverted: nope" in str(e)
    e = dec.decode(keccak(text="Panic(uint256)")[:4] + encode(["uint256"], [0x11]), contract="C")
    assert "0x11" in str(e)
    assert "without a decodable reason" in str(dec.decode(b"", contract="C"))


def test_artifact_is_loadable_without_node():
    art = load_artifact("TaskLedger")
    assert art["compiler"]["version"].startswith("0.8.37")
    assert art["settings"]["evmVersion"] == "cancun"
    assert art["bytecode"].startswith("0x") and len(art["deployedBytecode"]) > 1000
