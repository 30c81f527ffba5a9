"""Faults in deployment mode, on real anvil nodes with institutions as separate processes:
the chain node stopped and restarted from its state file, the RPC endpoint unreachable for a while
(retries with backoff, a clear error when it stays down, no corrupt state), and an institution
killed mid-task (the round closes by the deadline/quorum rule; the institution rejoins from the chain)."""
from __future__ import annotations

import time

import pytest
from conftest import needs_anvil
from drills import final_digests as _final_digests, reference_run, start_drill as _started, toy_source

from medchain.chain import LedgerClient
from medchain.chain.anvil import _rpc
from medchain.data import load_dataset, partition
from medchain.node import Deployment, rebuild_global
from medchain.protocol import CollabConfig

CFG = CollabConfig(rounds=3, batch_size=32, lr=3e-3, model="lenet")   # lenet: ~31 KB payloads, inline


@pytest.mark.anvil
@needs_anvil
def test_chain_restart_and_rpc_outage_resume_bit_identical(tmp_path):
    """anvil stops mid-training for ~8 s and restarts from its --state file: nodes 0 and 1 retry
    (node-level backoff beyond the client's own retries, logged) and go on; node 2, whose
    --rpc-timeout is 2 s, stops with a clear error, is restarted later and resumes from the chain.
    The final global model is bit-identical to the uninterrupted in-process run."""
    src = toy_source(tmp_path, size=28)
    with Deployment(3, CFG, data=src, workdir=tmp_path / "run", node_args={2: ["--rpc-timeout", "2"]}) as dep:
        reader = _started(dep)
        dep.wait_for(lambda: reader.current_round() >= 1, 120, "round 1 to open")
        dep.stop_chain()
        t_down = time.monotonic()
        dep.wait_for(lambda: not dep.nodes[2].running, 60, "institution 2 to give up", tolerate=(2,))
        assert dep.nodes[2].proc.returncode == 1
        err = dep.nodes[2].log_tail()
        assert "unreachable" in err and "rpc_timeout=2" in err and "resumes from the chain" in err
        assert "Traceback" not in err
        time.sleep(max(0.0, 8.0 - (time.monotonic() - t_down)))
        dep.restart_chain()
        dep.nodes[2].start()                      # restarted: rebuilds the model from the chain
        codes = dep.wait(240)
        assert codes == {0: 0, 1: 0, 2: 0}
        ref = reference_run(src, 3, CFG)
        assert _final_digests(dep) == {ref.final_digest.hex()}
        for r, h in enumerate(ref.history):           # every round's attestations agree with the reference
            assert {a.digest.hex() for a in reader.attestations(r)} == {h["digest"]}
            assert len(reader.attestations(r)) == 3
        log0 = dep.nodes[0].log_tail(20000)
        assert "unreachable" in log0 and "retrying in" in log0 and "reachable again" in log0
        log2 = dep.nodes[2].log_tail(20000)
        assert "resuming:" in log2


@pytest.mark.anvil
@needs_anvil
def test_killed_institution_round_closes_by_deadline_and_it_rejoins(tmp_path):
    """Institution 2 is SIGKILLed during round 1. The others submit, wait, and once the deadline
    block has passed with the quorum reached one of them closes the round itself; training goes on
    without institution 2. Restarted, it catches up from the chain (replays and attests the rounds it
    missed) and takes part in the next round. Every replica ends with the same model."""
    deadline = 30
    cfg = CollabConfig(**{**CFG.to_dict(), "rounds": 4})
    src = toy_source(tmp_path, size=28)
    # block_time=0: blocks only with transactions, so the test decides when a deadline passes
    with Deployment(3, cfg, data=src, workdir=tmp_path / "run", deadline_blocks=deadline, quorum=2,
                    block_time=0) as dep:
        reader = _started(dep)
        victim = dep.accounts[3].address
        dep.wait_for(lambda: reader.current_round() >= 1, 120, "round 1 to open")
        dep.nodes[2].kill()
        r = reader.current_round()
        if reader.has_submitted(r, victim):           # it got its update in before dying
            dep.wait_for(lambda: reader.current_round() > r, 60, f"round {r} to close", tolerate=(2,))
            r += 1
        dep.wait_for(lambda: reader.submitted_count(r) >= 2, 60, f"2 updates in round {r}", tolerate=(2,))
        assert reader.round_close_block(r) == 0       # still open: waiting for the dead member
        _rpc(dep.url, "anvil_mine", [hex(deadline + 1)])  # test only: let the deadline pass
        dep.wait_for(lambda: reader.round_close_block(r) != 0, 60, f"a member to close round {r}",
                     tolerate=(2,))
        assert reader.submitted_count(r) == 2 and not reader.has_submitted(r, victim)
        dep.nodes[2].start()                          # rejoin
        codes = dep.wait(240)
        assert codes == {0: 0, 1: 0, 2: 0}
        assert reader.has_submitted(r + 1, victim)    # it takes part again
        assert any(a.member == victim for a in reader.attestations(r))   # and attested what it missed
        closer_logs = dep.nodes[0].log_tail(20000) + dep.nodes[1].log_tail(20000)
        assert f"round {r}: deadline block" in closer_logs and "closed it" in closer_logs
        finals = _final_digests(dep)
        assert len(finals) == 1
        ds = load_dataset(src)
        observer = rebuild_global(reader, partition(ds, 3, "iid", seed=0)[0], 2)
        assert finals == {observer.global_digest().hex()} == {reader.majority_digest(cfg.rounds - 1).hex()}
        assert "resuming:" in dep.nodes[2].log_tail(20000)


@pytest.mark.anvil
@needs_anvil
def test_anvil_sigkill_mid_run_resumes_from_its_periodic_state_bit_identical(tmp_path):
    """anvil is SIGKILLed mid-task (no clean stop). It dumps its state every second, so restarted
    from the file it has lost at most the last second of blocks. Nodes retry while it is down; a
    node whose update was lost submits it again, a node that already replayed rounds the chain no
    longer has stops with a message saying so and is restarted. Every node ends with the model of
    the uninterrupted in-process run, bit for bit."""
    cfg = CollabConfig(**{**CFG.to_dict(), "rounds": 4})
    src = toy_source(tmp_path, size=28)
    with Deployment(3, cfg, data=src, workdir=tmp_path / "run") as dep:
        reader = _started(dep)
        dep.wait_for(lambda: reader.current_round() >= 1, 120, "round 1 to open")
        dep.wait_for(lambda: reader.submitted_count(1) >= 1, 120, "a first update in round 1")
        dep.kill_chain()                                  # right after a transaction: likely not dumped
        assert dep.state_file.is_file()
        time.sleep(6)                                     # longer than the client's own retries
        dep.restart_chain()
        reader = LedgerClient(dep.w3, dep.ledger.address)
        if not reader.started():          # the last ~1 s of blocks are lost: maybe even start() (fast rounds)
            dep.ledger.start()            # the admin sends again what the chain lost
        t_end = time.monotonic() + 300
        while any(p.running for p in dep.nodes) or any(p.proc.returncode != 0 for p in dep.nodes):
            assert time.monotonic() < t_end, "nodes did not finish after the chain came back"
            for p in dep.nodes:
                if p.proc.poll() not in (None, 0):
                    log = p.log_tail()
                    assert "the chain lost blocks" in log and "Traceback" not in log, log
                    p.start()                              # restarted: rebuilds from what the chain holds
            time.sleep(0.5)
        ref = reference_run(src, 3, cfg)
        assert _final_digests(dep) == {ref.final_digest.hex()}
        assert reader.majority_digest(cfg.rounds - 1) == ref.final_digest
        logs = "".join(p.log_tail(20000) for p in dep.nodes)
        assert "unreachable" in logs and "retrying in" in logs


def test_a_state_dump_truncated_by_a_crash_falls_back_to_the_last_complete_one(tmp_path):
    """anvil rewrites its --state file in place; a SIGKILL mid-write leaves it truncated (seen in CI:
    "EOF while parsing"). The start puts the last complete dump back; without one it says what to do."""
    from medchain.chain.anvil import AnvilNode

    state = tmp_path / "chain-state.json"
    node = AnvilNode(31337, state_file=state, state_interval=1)
    complete = b'{"block": {"number": "0x5"}, "accounts": {}}'
    state.write_bytes(complete[:17])                                  # truncated by the crash
    with pytest.raises(RuntimeError, match="not complete JSON.*move it away"):
        node._restore_state()
    assert state.read_bytes() == complete[:17]                        # nothing lost
    node.complete_state_file.write_bytes(complete)
    node._restore_state()
    assert state.read_bytes() == complete
    node._restore_state()                                             # a complete file is left alone
    assert state.read_bytes() == complete
