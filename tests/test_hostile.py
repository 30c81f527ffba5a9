"""One hostile member must not stall or steer a task, bad inputs are refused before anything is
deployed or started, and runs do not corrupt each other (issue 20).

Each FAIL row of the issue is a test here: a zero or huge self-reported sample count, a removed
member's update, a garbage attestation against the honest majority, `task create` with bad parameters or addresses, a Byzantine
index out of range, and two runs into one output folder. Replicas are real `Institution`s replaying
the real contract on the embedded chain (no training: synthetic updates keep these tests fast)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from eth_account import Account

from conftest import needs_anvil, toy_images
from medchain import codec
from medchain.aggregation import SparseUpdate, weighted_mean
from medchain.blobstore import MemoryBlobStore
from medchain.chain import (InvalidTask, LedgerClient, NotAMember, TooManySamples, ZeroSamples, advance_blocks,
                            connect, deploy_ledger, embedded_accounts)
from medchain.data.types import InstitutionData
from medchain.protocol import (AttestationMismatchError, CollabConfig, Institution, MemoryLedger,
                               check_attestations)

CFG = CollabConfig(rounds=3, model="cnn", max_samples=50)


def _data(n: int = 3) -> list[InstitutionData]:
    return [InstitutionData(i, toy_images(20, 10 * i), toy_images(8, 10 * i + 1), toy_images(8, 10 * i + 2))
            for i in range(n)]


@pytest.fixture()
def task():
    """A running 3-round task with 3 members on the embedded chain (no deadline, rule mean, cap
    50 samples per update), one Institution replica per member sharing a blob store."""
    w3 = connect()
    accts = embedded_accounts(w3)
    probe = Institution(_data(1)[0], 2, CFG, None)
    admin = deploy_ledger(w3, accts[0], CFG.model, probe.global_digest(), CFG.rounds,
                          params={**CFG.to_dict(), "layout_id": probe.layout.layout_id_hex}, deadline_blocks=5,
                          quorum=2, members=[a.address for a in accts[1:4]], start=True,
                          max_samples=CFG.max_samples)
    store = MemoryBlobStore()
    insts = [Institution(d, 2, CFG, admin.as_account(a), store) for d, a in zip(_data(), accts[1:4])]
    return admin, insts, store


def _delta(inst: Institution, value: float) -> np.ndarray:
    return np.full(inst.layout.size, value, np.float32)


def _submit(inst: Institution, r: int, delta: np.ndarray, n_samples: int):
    """Submit ``delta`` as inst's update for round r claiming ``n_samples`` (a hostile member can
    claim anything; the honest code path claims len(train))."""
    payload = codec.encode_update(delta, inst.layout.layout_id, total_size=inst.layout.size)
    inst.store.put(payload)
    return inst.ledger.submit_update(r, codec.digest(payload), delta.size, n_samples, b"")


def _expected(inst: Institution, deltas_weights: list[tuple[np.ndarray, float]]) -> bytes:
    """The digest of the global model after one mean round over exactly these updates (combined in
    the replicas' canonical order: by payload digest, then weight)."""
    from medchain.params import digest_vector

    def key(dw):
        return codec.digest(codec.encode_update(dw[0], inst.layout.layout_id, total_size=inst.layout.size)), dw[1]
    ups = [SparseUpdate(np.arange(d.size), d, w, d.size) for d, w in sorted(deltas_weights, key=key)]
    new = (inst.global_vec.astype(np.float64) + weighted_mean(ups)).astype(np.float32)
    return digest_vector(new, inst.layout)


# ------------------------------------------------------------------------------ sample counts
def test_zero_samples_is_refused_on_chain_and_the_task_still_finishes(task):
    admin, insts, _ = task
    hostile = insts[2]
    with pytest.raises(ZeroSamples, match="at least 1 training sample"):
        _submit(hostile, 0, _delta(hostile, 0.5), 0)
    assert admin.submitted_count(0) == 0 and not admin.has_submitted(0, hostile.ledger.account.address)
    for r in range(CFG.rounds):          # the hostile member never gets an update in; the others go on
        for inst in insts[:2]:
            inst.upload(r, _delta(inst, 1e-3 * (inst.index + 1)))
        advance_blocks(admin.w3, 6)
        admin.close_round()              # deadline passed with the quorum of 2: anyone may close
        digests = {inst.sync_round(r) for inst in insts}   # the hostile replica computes the same model
        assert len(digests) == 1
        check_attestations(admin, r, digests.pop(), 3)
    assert admin.finished()


def test_huge_sample_count_is_refused_and_a_capped_one_weighs_like_any_member(task):
    admin, insts, _ = task
    hostile = insts[2]
    poison = _delta(hostile, -1.0)                      # within max_abs_update (1e3)
    with pytest.raises(TooManySamples, match=r"n_samples=18446744073709551615.*cap of 50"):
        _submit(hostile, 0, poison, 2 ** 64 - 1)
    with pytest.raises(TooManySamples):
        _submit(hostile, 0, poison, CFG.max_samples + 1)
    assert admin.max_samples() == 50 and admin.task().max_samples == 50
    honest = [(_delta(i, 1e-3), float(i.n_samples)) for i in insts[:2]]
    for inst, (d, _) in zip(insts[:2], honest):
        inst.upload(0, d)
    _submit(hostile, 0, poison, CFG.max_samples)        # the most it may claim
    want = _expected(insts[0], honest + [(poison, 50.0)])
    digests = {inst.sync_round(0) for inst in insts}
    assert digests == {want}
    # the hostile weight is bounded by the cap: 50 / (20 + 20 + 50) of the aggregate, not ~100 %
    g = insts[0].global_vec.astype(np.float64) - Institution(_data(1)[0], 2, CFG, None).global_vec
    assert np.allclose(g, (20 * 1e-3 * 2 - 50) / 90, atol=1e-6)


def test_replicas_refuse_zero_and_over_cap_sample_counts_without_a_contract():
    """The chain-free reference (and a ledger deployed without a cap) apply the same rule: an
    update claiming 0 or more than max_samples is left out by every replica, the rest aggregated."""
    ledger = MemoryLedger(b"\0" * 32, 1)
    store = MemoryBlobStore()
    insts = [Institution(d, 2, CFG, ledger.as_account(f"m{d.index}"), store) for d in _data(4)]
    insts[0].upload(0, _delta(insts[0], 1e-3))
    insts[1].upload(0, _delta(insts[1], 3e-3))
    _submit(insts[2], 0, _delta(insts[2], -1.0), 0)
    _submit(insts[3], 0, _delta(insts[3], -2.0), 2 ** 64 - 1)
    want = _expected(insts[0], [(_delta(insts[0], 1e-3), 20.0), (_delta(insts[1], 3e-3), 20.0)])
    for inst in insts:
        assert inst.apply_round(0) == want
        assert [s for s, _ in inst.refused[0]] == ["m2", "m3"]
        assert all("max_samples" in why for _, why in inst.refused[0])


def test_the_contract_refuses_a_zero_cap():
    w3 = connect()
    admin = embedded_accounts(w3)[0]
    with pytest.raises(ValueError, match="max_samples"):
        deploy_ledger(w3, admin, "cnn", b"\1" * 32, 1, max_samples=0)
    from medchain.chain.errors import RevertDecoder
    from medchain.chain.artifacts import load_artifact
    from eth_abi import encode
    from eth_utils import keccak
    data = keccak(text="InvalidTask(string)")[:4] + encode(["string"], ["maxSamples must be at least 1"])
    err = RevertDecoder(load_artifact("TaskLedger")["abi"]).decode(data, contract="c")
    assert isinstance(err, InvalidTask) and "maxSamples" in str(err)


# ------------------------------------------------------------------------------ removed members
def test_a_garbage_attestation_cannot_halt_the_honest_majority(task):
    """A member attests garbage. With one honest attestation beside it (1 of 3 members each) no
    digest has a majority: the round is pending, the dissenter named. Once the second honest member
    attests, 2 of 3 agree: settled, the dissenter still named (logged, left to the admin). A replica
    whose digest a majority contradicts stops. After the admin removes the member its attestation
    no longer counts, for running and for restarted replicas alike."""
    admin, insts, store = task
    hostile = insts[2]
    bad_member = hostile.ledger.account.address
    for inst in insts:
        inst.upload(0, _delta(inst, 1e-3))
    hostile.ledger.attest(0, hashlib.sha256(b"garbage").digest())
    digest = {inst.apply_round(0) for inst in insts[:2]}.pop()
    insts[0].ledger.attest(0, digest)
    pending = check_attestations(admin, 0, digest)
    assert not pending.settled and pending.dissenters == (bad_member,)
    assert set(pending.attesters) == {bad_member, insts[0].ledger.account.address}
    insts[1].ledger.attest(0, digest)
    settled = check_attestations(admin, 0, digest)
    assert settled.settled and settled.dissenters == (bad_member,)
    with pytest.raises(AttestationMismatchError, match="round 0: .*a majority of the members attested another"):
        check_attestations(admin, 0, hashlib.sha256(b"what the minority computed").digest())
    admin.remove_member(bad_member)
    after = check_attestations(admin, 0, digest)                      # its attestation stops counting
    assert after.settled and after.dissenters == () and bad_member not in after.attesters
    fresh = Institution(_data(1)[0], 2, CFG, admin.as_account(insts[0].ledger.account), store)
    assert fresh.replay_closed(1) == [digest]                  # a restarted replica too
    again = check_attestations(fresh.ledger, 0, digest)
    assert again.settled and again.dissenters == ()


def test_a_removed_members_update_is_withdrawn_on_every_replica(task):
    """The hostile member submits a poisoned update to round 0, then the admin removes it before the
    round closes: the update stays in the log but is withdrawn — not counted for the close, left out
    by every replica (also one that rebuilds from the chain later)."""
    admin, insts, store = task
    hostile = insts[2]
    _submit(hostile, 0, _delta(hostile, -5.0), 20)
    admin.remove_member(hostile.ledger.account.address)
    assert admin.submitted_count(0) == 0 and admin.withdrawn(0, hostile.ledger.account.address)
    with pytest.raises(NotAMember):
        _submit(hostile, 1, _delta(hostile, -5.0), 20)
    honest = [(_delta(i, 1e-3 * (i.index + 1)), 20.0) for i in insts[:2]]
    for inst, (d, _) in zip(insts[:2], honest):
        inst.upload(0, d)
    assert admin.round_close_block(0) > 0 and admin.submitted_count(0) == 2   # closed by the 2 members
    ups = admin.updates(0)
    assert [u.withdrawn for u in ups] == [True, False, False]
    want = _expected(insts[0], honest)
    for inst in insts:
        assert inst.apply_round(0) == want
        assert [s for s, _ in inst.refused[0]] == [hostile.ledger.account.address]
    late = Institution(_data(1)[0], 2, CFG, LedgerClient(admin.w3, admin.address), store)
    assert late.replay_closed(1) == [want]


# ------------------------------------------------------------------------------ validate first
@pytest.mark.parametrize("field,value,message", [
    ("lr", -1.0, "lr must be > 0"), ("batch_size", 0, "batch_size must be >= 1"),
    ("max_inline_bytes", -1, "max_inline_bytes must be >= 0"), ("max_abs_update", -5.0, "max_abs_update must be > 0"),
    ("max_abs_update", float("nan"), "finite"), ("lr", float("inf"), "finite"), ("rounds", 0, "rounds must be >= 1"),
    ("optimizer", "adagrad", "optimizer must be one of"), ("server_momentum", 1.0, "server_momentum"),
    ("max_samples", 0, "max_samples"), ("model", "resnet9000", "model must be one of"), ("seed", -1, "seed"),
])
def test_collab_config_refuses_every_bad_parameter(field, value, message):
    with pytest.raises(ValueError, match=message):
        CollabConfig(**{field: value})


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "argument --lr: -1 is out of range"),
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range"),
    (["--max-inline-bytes", "-1"], "argument --max-inline-bytes: -1 is out of range"),
    (["--max-abs-update", "-5"], "argument --max-abs-update: -5 is out of range"),
    (["--lr", "nan"], "not a finite number"),
    (["--quorum", "0"], "argument --quorum"),
    (["--max-samples", "0"], "argument --max-samples"),
])
def test_task_create_refuses_bad_numbers_at_parse_time(argv, message, capsys):
    from medchain.cli import main
    with pytest.raises(SystemExit) as info:
        main(["task", "create", "--rpc", "http://127.0.0.1:9", "--key-env", "K", "--members", "0x" + "22" * 20,
              "--classes", "2", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--poll-interval", "-1"], "argument --poll-interval: -1 is out of range"),
    (["--rpc-timeout", "0"], "argument --rpc-timeout: 0 is out of range"),
    (["--threads", "0"], "argument --threads"),
    (["--institution-index", "-1"], "argument --institution-index"),
    (["--fraction", "1.5"], "argument --fraction"),
])
def test_node_options_are_validated_at_parse_time(argv, message, capsys):
    from medchain.cli import main
    base = {"--rpc": "http://127.0.0.1:9", "--ledger": "0x" + "00" * 20, "--key-env": "K",
            "--institutions": "2", "--institution-index": "0"}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    with pytest.raises(SystemExit) as info:
        main(["node", *[x for kv in base.items() for x in kv]])
    assert info.value.code == 2 and message in capsys.readouterr().err


BAD_MEMBERS = [
    ("0xdead", "is not an address"),
    ("0x" + "00" * 20, "zero address"),
    # a valid address with one letter's case flipped: wrong EIP-55 checksum
    (Account.from_key(b"\x07" * 32).address.swapcase().replace("0X", "0x"), "checksum"),
]


@pytest.mark.parametrize("member,message", BAD_MEMBERS)
def test_task_create_refuses_bad_member_addresses_before_connecting(member, message, monkeypatch, capsys):
    from medchain.cli import main
    monkeypatch.setenv("TEST_ADMIN_KEY", "0x" + "11" * 32)
    rc = main(["task", "create", "--rpc", "http://127.0.0.1:9", "--key-env", "TEST_ADMIN_KEY",
               "--members", f"0x{'22' * 20},{member}", "--classes", "2"])
    assert rc == 1 and message in capsys.readouterr().err


def test_create_task_refuses_repeated_members_and_bad_quorum_before_any_transaction():
    from medchain.node import create_task
    w3 = connect()
    admin, a, b = embedded_accounts(w3)[:3]
    nonce = w3.eth.get_transaction_count(admin.address)
    with pytest.raises(ValueError, match="more than once"):
        create_task(w3, admin, CFG, [a.address, a.address.lower()], n_classes=2)
    with pytest.raises(ValueError, match="quorum"):
        create_task(w3, admin, CFG, [a.address, b.address], n_classes=2, quorum=3)
    with pytest.raises(ValueError, match="not an address"):
        create_task(w3, admin, CFG, [a.address, "0xdead"], n_classes=2)
    assert w3.eth.get_transaction_count(admin.address) == nonce      # nothing was deployed
    ledger = create_task(w3, admin, CFG, [a.address, b.address.lower()], n_classes=2)
    assert ledger.members() == [a.address, b.address] and ledger.max_samples() == CFG.max_samples


@pytest.mark.anvil
@needs_anvil
def test_task_create_with_a_bad_member_leaves_no_orphan_contract_on_a_node(monkeypatch, capsys):
    from medchain.chain.anvil import AnvilNode
    from medchain.cli import main
    with AnvilNode(chain_id=7621) as node:
        admin = Account.from_key(node.dev_keys[0]).address
        monkeypatch.setenv("TEST_ADMIN_KEY", node.dev_keys[0])
        w3 = connect(node.url)
        before = w3.eth.get_transaction_count(admin)
        rc = main(["task", "create", "--rpc", node.url, "--key-env", "TEST_ADMIN_KEY", "--members",
                   f"{Account.from_key(node.dev_keys[1]).address},0xdead", "--classes", "2", "--model", "lenet"])
        assert rc == 1 and "'0xdead' is not an address" in capsys.readouterr().err
        assert w3.eth.get_transaction_count(admin) == before and w3.eth.block_number == 0


# ------------------------------------------------------------------------------ runs and drills
def test_simulate_refuses_a_byzantine_index_out_of_range(tmp_path, capsys):
    from medchain.cli import main
    out = tmp_path / "sim"
    rc = main(["simulate", "--processes", "2", "--byzantine", "9:signflip", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "--byzantine index 9 is out of range" in err and "0..1" in err
    assert not out.exists()                                     # nothing started, nothing written
    rc = main(["simulate", "--processes", "2", "--byzantine", "1:sideways", "--out", str(out)])
    assert rc == 1 and "unknown attack 'sideways'" in capsys.readouterr().err


def test_run_dir_refuses_a_non_empty_folder_and_a_concurrent_run(tmp_path):
    from medchain.node import LOCK_NAME, RunDir, fresh_run_dir
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.csv").write_text("round\n0\n")
    with pytest.raises(RuntimeError, match=r"is not empty \(metrics.csv\).*one folder holds one run"):
        RunDir(old).__enter__()
    assert sorted(p.name for p in old.iterdir()) == ["metrics.csv"]      # untouched, no lock left
    busy = tmp_path / "busy"
    with RunDir(busy) as path:
        assert (path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(RuntimeError, match=rf"in use by another run \(process {os.getpid()}"):
            RunDir(busy).__enter__()
    assert not (busy / LOCK_NAME).exists()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / LOCK_NAME).write_text("999999999 2026-01-01T00:00:00\n")   # no such process
    with pytest.raises(RuntimeError, match="no longer running"):
        RunDir(stale).__enter__()
    a = fresh_run_dir(tmp_path / "base")
    assert not a.exists() and a.name.startswith("run-")
    a.mkdir(parents=True)
    assert fresh_run_dir(tmp_path / "base") != a                # never an existing folder


def test_a_second_simulate_into_a_locked_folder_is_refused(tmp_path, capsys):
    """Another process holds the folder (a run in progress): `medchain simulate --out` into it stops
    at once with a message naming that process; the folder is left as it was."""
    from medchain.cli import main
    out = tmp_path / "shared"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medchain.node import RunDir\n"
         f"with RunDir({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        rc = main(["simulate", "--processes", "2", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and f"in use by another run (process {holder.pid}" in err
        assert time.monotonic() - t0 < 30
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # rerunning into a folder that holds an old run is refused as well
    (out / ".medchain-run.lock").unlink(missing_ok=True)
    (out / "summary.json").write_text("{}")
    rc = main(["simulate", "--processes", "2", "--out", str(out)])
    assert rc == 1 and "is not empty (summary.json)" in capsys.readouterr().err


def test_the_drill_caps_sample_counts_at_the_largest_share(tmp_path):
    from medchain.data import save_npz
    from medchain.data.types import Dataset
    from medchain.node import Deployment
    ds = Dataset("toy", toy_images(90, 1), toy_images(30, 2), toy_images(30, 3), 2, ["a", "b"])
    src = str(save_npz(ds, tmp_path / "toy.npz"))
    dep = Deployment(3, CollabConfig(rounds=1), data=src, workdir=tmp_path / "run")
    assert dep.largest_share() == 30
    with pytest.raises(ValueError, match="index 3 is out of range.*0..2"):
        Deployment(3, CollabConfig(rounds=1), data=src, workdir=tmp_path / "run2", byzantine={3: "huge"})


# ------------------------------------------------------------------------------ deployment mode
@pytest.mark.anvil
@needs_anvil
def test_hostile_members_cannot_stall_or_steer_institution_processes(tmp_path, capsys):
    """Three honest `medchain node` processes on anvil and two hostile members driven from here.
    A tries to claim 0 and 2**64-1 samples (refused by the contract), gets a poisoned update in with
    the largest legal count, and is removed before the round closes: its update is withdrawn. B
    closes round 0 and attests a garbage digest at once: the honest nodes log it and go on (3 of the
    4 active members attest their digest), none stops; the admin removes B so that the later rounds
    close without it. Every replica ends with the same model, and A's update is in none of them."""
    from drills import toy_source

    from medchain.chain import dev_accounts
    from medchain.models import build_model
    from medchain.node import Deployment, rebuild_global
    from medchain.data import load_dataset, partition
    from medchain.params import Layout

    cfg = CollabConfig(rounds=3, batch_size=32, lr=3e-3, model="lenet")
    src = toy_source(tmp_path, size=28)
    slow_poll = {i: ["--poll-interval", "1.0"] for i in range(3)}   # B's garbage lands before their check
    with Deployment(3, cfg, data=src, workdir=tmp_path / "run", node_args=slow_poll) as dep:
        dep.start_chain()
        dep.create_task(1, 2)
        cap = dep.cfg.max_samples
        assert cap == max(len(d.train) for d in partition(load_dataset(src), 3, "iid", seed=0))
        a, b = dev_accounts(dep.w3, 6)[4:6]
        dep.ledger.add_member(a.address)
        dep.ledger.add_member(b.address)
        la, lb = dep.ledger.as_account(a), dep.ledger.as_account(b)
        layout = Layout.from_module(build_model("lenet", 1, 2, cfg.seed))

        def payload(value: float) -> tuple[bytes, bytes]:
            p = codec.encode_update(np.full(layout.size, value, np.float32), layout.layout_id,
                                    total_size=layout.size)
            return codec.digest(p), p
        dep.launch()
        dep.start_task()
        d, p = payload(-500.0)                                       # within max_abs_update
        with pytest.raises(ZeroSamples):
            la.submit_update(0, d, layout.size, 0, p)
        with pytest.raises(TooManySamples):
            la.submit_update(0, d, layout.size, 2 ** 64 - 1, p)
        la.submit_update(0, d, layout.size, cap, p)
        dep.ledger.remove_member(a.address)                          # before round 0 closes
        assert dep.ledger.withdrawn(0, a.address) and dep.ledger.current_round() == 0
        reader = LedgerClient(dep.w3, dep.ledger.address)
        dep.wait_for(lambda: reader.submitted_count(0) == 3, 180, "the 3 honest updates of round 0")
        d0, p0 = payload(0.0)
        lb.submit_update(0, d0, layout.size, 1, p0)                  # closes round 0 ...
        lb.attest(0, hashlib.sha256(b"garbage").digest())            # ... and attests garbage at once
        dissent = f"member {b.address} attested a global digest other than this node's"
        dep.wait_for(lambda: any(dissent in n.log_tail(200_000) for n in dep.nodes), 120,
                     "an honest node to log the garbage attestation")   # a node that stops fails this wait
        dep.ledger.remove_member(b.address)
        with pytest.raises(NotAMember):
            la.submit_update(1, d, layout.size, cap, p)
        assert dep.wait(300) == {0: 0, 1: 0, 2: 0}
        assert not any("institutions disagree" in n.log_tail(200_000) for n in dep.nodes)
        finals = {m["final_digest"] for n in dep.nodes for m in n.metrics() if m["event"] == "final"}
        observer = rebuild_global(reader, partition(load_dataset(src), 3, "iid", seed=0)[0], 2)
        assert finals == {observer.global_digest().hex()} == {reader.majority_digest(cfg.rounds - 1).hex()}
        assert [(u.sender, u.withdrawn) for u in reader.updates(0) if u.sender in (a.address, b.address)] == \
            [(a.address, True), (b.address, False)]
        assert observer.refused[0][0][0] == a.address and "withdrawn" in observer.refused[0][0][1]
        assert all(len(reader.updates(r)) == 3 for r in (1, 2))
        from medchain.cli import main
        capsys.readouterr()
        assert main(["ledger", "show", dep.url, dep.ledger.address]) == 0
        shown = capsys.readouterr().out
        assert shown.count("WITHDRAWN") == 1 and f"max samples per update {cap:,}" in shown


def test_a_round_whose_only_update_is_refused_leaves_the_model_unchanged_on_every_replica(task):
    """Deadline + quorum 1 lets a round close with one update; if that update is unusable (garbage
    payload behind a valid digest) every replica keeps the model as it was and the task goes on."""
    admin, insts, _ = task
    before = insts[0].global_digest()
    garbage = b"not an update"
    insts[2].ledger.submit_update(0, codec.digest(garbage), 3, 20, garbage)
    insts[0].upload(0, _delta(insts[0], 1e-3))          # quorum 2 reached: one good, one garbage
    advance_blocks(admin.w3, 6)
    admin.close_round()
    digests = {inst.apply_round(0) for inst in insts}
    assert len(digests) == 1 and digests != {before}
    insts[1].ledger.submit_update(1, codec.digest(garbage), 3, 20, garbage)
    insts[2].ledger.submit_update(1, hashlib.sha256(b"x").digest(), 3, 20, garbage)   # digest mismatch
    advance_blocks(admin.w3, 6)
    admin.close_round()
    kept = insts[0].global_digest()
    for inst in insts:
        assert inst.apply_round(1) == kept                    # nothing acceptable: model unchanged
        assert len(inst.refused[1]) == 2 and inst.rounds_applied == 2
