"""Deployment mode: `medchain node` processes over a real anvil node, `medchain task create`,
`medchain simulate` — and the same global model as the in-process simulation, bit for bit."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from eth_account import Account

from medchain.chain.anvil import AnvilNode, AnvilNotFound, find_anvil

from conftest import ANVIL_MISSING as _MISSING, needs_anvil  # noqa: E402
from drills import reference_run, toy_source  # noqa: E402


@pytest.mark.anvil
@needs_anvil
def test_simulate_processes_match_the_in_process_run_bit_for_bit(tmp_path):
    from medchain.cli import main
    from medchain.protocol import CollabConfig

    src = toy_source(tmp_path)
    out = tmp_path / "sim"
    # cnn: ~106k parameters → 425 KB payloads, so updates travel through the shared blob store
    rc = main(["simulate", "--processes", "3", "--data", src, "--rounds", "2", "--model", "cnn",
               "--batch-size", "32", "--lr", "3e-3", "--out", str(out), "--timeout", "240"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    cfg = CollabConfig(rounds=2, batch_size=32, lr=3e-3, model="cnn")
    ref = reference_run(src, 3, cfg)
    assert summary["final_digest"] == ref.final_digest.hex()           # separate processes == simulation
    assert summary["final_digest_on_chain"] == ref.final_digest.hex()  # and what the members attested
    assert summary["all_nodes_agree"] and summary["node_final_digests"] == [ref.final_digest.hex()]
    assert summary["final_acc"] == pytest.approx(ref.history[-1]["acc"])
    assert summary["ledger_address"].startswith("0x") and summary["final_block_hash"].startswith("0x")
    assert summary["parameters"]["processes"] == 3 and summary["seed"] == 0
    assert all(v is not None and v > 0 for v in summary["ready_s"].values())
    metrics = pd.read_csv(out / "metrics.csv")
    rounds = metrics[metrics.event == "round"]
    assert len(rounds) == 6 and set(rounds.institution) == {0, 1, 2}
    assert (rounds.n_updates == 3).all() and rounds.submitted.all()
    per_round = rounds.groupby("round").digest.unique()
    assert [list(d) for d in per_round] == [[h["digest"]] for h in ref.history]
    assert (out / "run" / "blobs").is_dir()                               # payloads went off chain
    from medchain.chain import ANVIL_DEV_KEYS
    log = (out / "run" / "node-0.log").read_text()
    assert "round 1 closed (2 of 2)" in log and "ACC" in log
    assert not any(k[2:] in log for k in ANVIL_DEV_KEYS)               # keys never reach the logs


@pytest.fixture(scope="module")
def anvil_node():
    if _MISSING is not None:
        pytest.skip(f"anvil not installed: {_MISSING}")
    with AnvilNode(chain_id=7601) as node:
        yield node


def _create(node, monkeypatch, capsys, *extra):
    from medchain.cli import main

    monkeypatch.setenv("TEST_ADMIN_KEY", node.dev_keys[0])
    members = ",".join(Account.from_key(k).address for k in node.dev_keys[1:4])
    rc = main(["task", "create", "--rpc", node.url, "--key-env", "TEST_ADMIN_KEY", "--members", members,
               "--model", "lenet", "--rounds", "3", *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out.strip().splitlines()[-1]


@pytest.mark.anvil
def test_task_create_records_the_task_on_chain(anvil_node, monkeypatch, capsys):
    from medchain.chain import LedgerClient, connect

    address = _create(anvil_node, monkeypatch, capsys, "--classes", "2", "--aggregation", "trimmed_mean:0.2",
                      "--deadline-blocks", "7", "--quorum", "2")
    t = LedgerClient(connect(anvil_node.url), address).task()
    assert t.started and t.n_rounds == 3 and t.round_deadline_blocks == 7 and t.quorum == 2
    assert t.params["aggregation"] == "trimmed_mean:0.2" and t.params["model"] == "lenet"
    assert t.params["n_classes"] == 2 and len(t.params["layout_id"]) == 64
    assert LedgerClient(connect(anvil_node.url), address).members() == \
        [Account.from_key(k).address for k in anvil_node.dev_keys[1:4]]


def test_task_create_refuses_an_unknown_rule_before_deploying(monkeypatch, capsys):
    from medchain.cli import main

    monkeypatch.setenv("TEST_ADMIN_KEY", "0x" + "11" * 32)
    rc = main(["task", "create", "--rpc", "http://127.0.0.1:9", "--key-env", "TEST_ADMIN_KEY",
               "--members", "0x" + "22" * 20, "--classes", "2", "--aggregation", "max"])
    assert rc == 1 and "unknown aggregation rule 'max'" in capsys.readouterr().err


def _node_argv(node, address, src, key_env="TEST_NODE_KEY", index=0):
    return ["node", "--rpc", node.url, "--ledger", address, "--key-env", key_env, "--data", src,
            "--institutions", "3", "--institution-index", str(index), "--rpc-timeout", "5"]


@pytest.mark.anvil
def test_node_refuses_to_run_for_a_non_member(anvil_node, monkeypatch, capsys, tmp_path):
    from medchain.cli import main

    address = _create(anvil_node, monkeypatch, capsys, "--classes", "2", "--channels", "1")
    monkeypatch.setenv("TEST_NODE_KEY", anvil_node.dev_keys[8])      # not among the members
    rc = main(_node_argv(anvil_node, address, toy_source(tmp_path)))
    err = capsys.readouterr().err
    assert rc == 1 and "is not a member of the task" in err and "addMember" in err
    assert anvil_node.dev_keys[8][2:] not in err                      # the key is never echoed


@pytest.mark.anvil
def test_node_refuses_a_task_whose_model_layout_differs(anvil_node, monkeypatch, capsys, tmp_path):
    from medchain.cli import main

    address = _create(anvil_node, monkeypatch, capsys, "--classes", "3")   # the data have 2 classes
    monkeypatch.setenv("TEST_NODE_KEY", anvil_node.dev_keys[1])
    rc = main(_node_argv(anvil_node, address, toy_source(tmp_path)))
    assert rc == 1 and "model layout mismatch" in capsys.readouterr().err


def test_node_stops_with_a_clear_error_when_the_rpc_endpoint_stays_down():
    import socket
    import time

    from medchain.node import NodeError, run_node

    with socket.socket() as s:           # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(NodeError, match=r"cannot reach the RPC endpoint for 1 s.*127\.0\.0\.1"):
        run_node(f"http://127.0.0.1:{port}", "0x" + "00" * 20, Account.create(), None, 2, rpc_timeout=1.0)
    assert time.monotonic() - t0 < 15
