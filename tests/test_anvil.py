"""The ledger client against real JSON-RPC nodes (anvil 1.7.1 from contracts/node_modules)."""
from __future__ import annotations

import hashlib
import socket

import pytest
from eth_account import Account

from medchain.chain import (AlreadySubmitted, LedgerClient, NotAMember, chain_identity, connect,
                            deploy_ledger, advance_blocks)
from medchain.chain.anvil import AnvilNode, AnvilNotFound, find_anvil, start_nodes


# Tests that run a node; the last test (the error message for a missing binary) runs everywhere.
from conftest import ANVIL_MISSING as _MISSING, needs_anvil  # noqa: E402

INIT = hashlib.sha256(b"init").digest()


def _run_one_round(url: str, keys) -> tuple[LedgerClient, list]:
    """The same code for every chain: deploy, add 3 members, run round 0, attest."""
    w3 = connect(url)
    admin, *members = [Account.from_key(k) for k in keys[:4]]
    ledger = deploy_ledger(w3, admin, "cnn-small", INIT, 2, {"theta_u": 0.1},
                           members=[m.address for m in members], start=True)
    sent = []
    for i, m in enumerate(members):
        payload = hashlib.sha256(f"{url}{i}".encode()).digest() * 64  # 2 KB
        digest = hashlib.sha256(payload).digest()
        ledger.as_account(m).submit_update(0, digest, 512, 100 + i, payload)
        sent.append((m.address, digest, payload))
    g = hashlib.sha256(b"global-0").digest()
    for m in members:
        ledger.as_account(m).attest(0, g)
    return ledger, sent


@pytest.mark.anvil
@needs_anvil
def test_two_chains_at_once_same_client_code():
    nodes = start_nodes(2, base_chain_id=7101)
    try:
        assert [n.chain_id for n in nodes] == [7101, 7102] and nodes[0].url != nodes[1].url
        results = [_run_one_round(n.url, n.dev_keys) for n in nodes]
        idents = set()
        for node, (ledger, sent) in zip(nodes, results):
            assert ledger.w3.eth.chain_id == node.chain_id
            assert ledger.current_round() == 1
            assert [(u.sender, u.digest, u.payload) for u in ledger.updates(0)] == sent
            assert ledger.majority_digest(0) == hashlib.sha256(b"global-0").digest()
            idents.add(chain_identity(ledger.w3, ledger.address))
            # a refused transaction raises the decoded error on a real node too
            member = ledger.as_account(Account.from_key(node.dev_keys[1]))
            with pytest.raises(AlreadySubmitted):
                member.submit_update(1, b"\x01" * 32, 1, 1)  # round 1: ok
                member.submit_update(1, b"\x01" * 32, 1, 1)  # second time: refused
            with pytest.raises(NotAMember, match="not an active member"):
                ledger.as_account(Account.from_key(node.dev_keys[7])).submit_update(1, b"\x01" * 32, 1, 1)
            # and a mined revert (explicit gas skips the simulation) is decoded by replay
            with pytest.raises(AlreadySubmitted) as info:
                member.submit_update(1, b"\x01" * 32, 1, 1, gas=200_000)
            assert ledger.w3.eth.get_transaction_receipt(info.value.tx_hash)["status"] == 0
        assert len(idents) == 2  # same address on both chains, different chain ids
    finally:
        for n in nodes:
            n.stop()
    assert not any(n.running for n in nodes)


@pytest.mark.anvil
@needs_anvil
def test_websocket_url_and_deadline_on_node():
    with AnvilNode(7111) as node:
        w3 = connect(node.ws_url)
        assert w3.eth.chain_id == 7111
        admin, m1, m2 = [Account.from_key(k) for k in node.dev_keys[:3]]
        ledger = deploy_ledger(w3, admin, "cnn", INIT, 1, {}, deadline_blocks=2, quorum=1,
                               members=[m1.address, m2.address], start=True)
        ledger.as_account(m1).submit_update(0, b"\x02" * 32, 1, 1)
        advance_blocks(w3, 2, admin)   # standard transactions only: works on any node
        ledger.close_round()
        assert ledger.finished() and len(ledger.updates(0)) == 1


def test_unreachable_url_raises_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    url = f"http://user:secret@127.0.0.1:{port}/v3/apikey"
    with pytest.raises(ConnectionError) as info:
        connect(url, attempts=2)
    msg = str(info.value)
    assert f"127.0.0.1:{port}" in msg and "node is running" in msg
    assert "secret" not in msg and "apikey" not in msg


@pytest.mark.anvil
@needs_anvil
def test_state_persists_across_restart(tmp_path):
    state = tmp_path / "chain-7121.json"
    with AnvilNode(7121, state_file=state) as node:
        ledger, sent = _run_one_round(node.url, node.dev_keys)
        address, block = ledger.address, ledger.w3.eth.block_number
    assert state.is_file() and state.stat().st_size > 0
    with AnvilNode(7121, state_file=state) as node:
        w3 = connect(node.url)
        assert w3.eth.block_number == block
        ledger = LedgerClient(w3, address)
        assert ledger.current_round() == 1 and len(ledger.members()) == 3
        assert [(u.sender, u.digest, u.payload) for u in ledger.updates(0)] == sent
        # and the chain goes on from there
        m = Account.from_key(node.dev_keys[1])
        ledger.as_account(m).submit_update(1, b"\x03" * 32, 1, 1)
        assert ledger.submitted_count(1) == 1


@pytest.mark.anvil
@needs_anvil
def test_wait_round_closed_from_another_connection():
    """A separate client (its own connection, as another process would have) waits for the round."""
    import threading

    with AnvilNode(7131) as node:
        admin, m1, m2 = [Account.from_key(k) for k in node.dev_keys[:3]]
        ledger = deploy_ledger(connect(node.url), admin, "cnn", INIT, 2, {},
                               members=[m1.address, m2.address], start=True)
        watcher = LedgerClient(connect(node.url), ledger.address)
        got = {}
        t = threading.Thread(target=lambda: got.update(
            block=watcher.wait_round_closed(0, timeout=30, poll_interval=0.05)))
        t.start()
        ledger.as_account(m1).submit_update(0, b"\x01" * 32, 1, 1)
        ledger.as_account(m2).submit_update(0, b"\x02" * 32, 1, 1)
        t.join(timeout=30)
        assert got["block"] == ledger.round_close_block(0) > 0


@pytest.mark.anvil
@needs_anvil
def test_node_going_away_retries_then_connection_error(monkeypatch, caplog):
    import medchain.chain.connection as conn
    monkeypatch.setattr(conn, "RETRY_ATTEMPTS", 3)
    monkeypatch.setattr(conn, "RETRY_BACKOFF", 0.01)
    node = AnvilNode(7141).start()
    w3 = connect(node.url)
    admin = Account.from_key(node.dev_keys[0])
    ledger = deploy_ledger(w3, admin, "cnn", INIT, 1, {})
    node.stop()
    with caplog.at_level("WARNING", logger="medchain.chain"):
        with pytest.raises(ConnectionError, match="cannot reach the Ethereum node"):
            ledger.current_round()
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2


def test_http_error_is_clear_and_does_not_echo_the_url():
    import http.server
    import threading

    class Deny(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(401)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConnectionError, match="HTTP 401") as info:
            connect(f"http://127.0.0.1:{server.server_port}/v3/topsecretkey")
        assert "topsecretkey" not in str(info.value)
    finally:
        server.shutdown()


def _cli(argv) -> int:
    import argparse

    from medchain.cli import chain as chain_cli
    parser = argparse.ArgumentParser(prog="medchain")
    chain_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.anvil
@needs_anvil
def test_cli_status_and_ledger_show(capsys):
    with AnvilNode(7151) as node:
        ledger, sent = _run_one_round(node.url, node.dev_keys)
        assert _cli(["chain", "status", node.url]) == 0
        out = capsys.readouterr().out
        assert "chain id:     7151" in out and "reachable:    yes" in out
        assert _cli(["ledger", "show", node.url, ledger.address]) == 0
        out = capsys.readouterr().out
        assert f"eip155:7151:{ledger.address}" in out and "cnn-small" in out
        assert "round 0: blocks" in out and out.count("  update  ") == 3
        assert "mismatches 0" in out and "round 1:" in out and "max samples per update none" in out
    assert _cli(["chain", "status", "http://127.0.0.1:9"]) == 1  # nothing listens on port 9
    assert "reachable: no" in capsys.readouterr().out


def test_missing_binary_message(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDCHAIN_ANVIL", str(tmp_path / "nope"))
    with pytest.raises(AnvilNotFound, match="not an executable"):
        AnvilNode(1).start()
    monkeypatch.delenv("MEDCHAIN_ANVIL")
    import medchain.chain.anvil as anvil_mod
    monkeypatch.setattr(anvil_mod, "_npm_binary", lambda: tmp_path / "nope")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AnvilNotFound, match="npm install"):
        find_anvil()


# ------------------------------------------------------------------------------ weak spots (issue 20)
@pytest.mark.anvil
@needs_anvil
def test_a_1mb_inline_payload_is_payload_too_large_not_out_of_gas():
    import os

    from medchain.chain import PayloadTooLarge
    with AnvilNode(7161) as node:
        admin, m = [Account.from_key(k) for k in node.dev_keys[:2]]
        w3 = connect(node.url)
        ledger = deploy_ledger(w3, admin, "cnn", INIT, 1, {}, members=[m.address], start=True)
        nonce = w3.eth.get_transaction_count(m.address)
        payload = os.urandom(1_000_000)      # its calldata floor alone (~40 M gas) exceeds a block
        with pytest.raises(PayloadTooLarge, match="blob store") as info:
            ledger.as_account(m).submit_update(0, hashlib.sha256(payload).digest(), 1, 1, payload)
        assert "out of gas" not in str(info.value).lower() and "calldata is 1,000," in str(info.value)
        assert w3.eth.get_transaction_count(m.address) == nonce and ledger.submitted_count(0) == 0


def _serve(body: bytes, content_type: str):
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("body,content_type", [
    (b"<html><body>It works!</body></html>", "text/html"),
    (b'{"status": "ok"}', "application/json"),
    (b'{"jsonrpc": "2.0", "id": 0, "result": "not a number"}', "application/json"),
], ids=["html", "json", "bad-result"])
def test_a_url_that_is_not_an_ethereum_node_is_one_clear_error(body, content_type, capsys):
    server = _serve(body, content_type)
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(ConnectionError, match="not as an Ethereum JSON-RPC node"):
            connect(url, attempts=1)
        from medchain.cli import main
        assert main(["ledger", "show", url, "0x" + "11" * 20]) == 1
        err = capsys.readouterr().err
        assert "not as an Ethereum JSON-RPC node" in err and "Traceback" not in err
        assert err.count("\n") == 1                                   # one line
        assert _cli(["chain", "status", url]) == 1
        assert "reachable: no" in capsys.readouterr().out
    finally:
        server.shutdown()


@pytest.mark.anvil
@needs_anvil
def test_chain_up_on_a_busy_port_is_an_error_not_success(capsys):
    from medchain.cli import main
    with AnvilNode(7171) as node:                     # another node holds the port
        with pytest.raises(RuntimeError, match=f"port {node.port} .* already in use"):
            AnvilNode(7171, port=node.port).start()
        assert main(["chain", "up", "--port", str(node.port)]) == 1
        out = capsys.readouterr()
        assert "already in use" in out.err and "Ctrl-C" not in out.out and "http://" not in out.out
        assert connect(node.url).eth.chain_id == 7171          # the other node is untouched
    with pytest.raises(SystemExit):
        main(["chain", "up", "--port", "70000"])


@pytest.mark.anvil
@needs_anvil
def test_state_interval_keeps_the_chain_through_a_sigkill(tmp_path):
    """Killed without a clean stop, a node with --state-interval restarts from its last dump
    (at most one interval old); without it, nothing since the last clean stop survives."""
    import time
    kept = tmp_path / "kept.json"
    with AnvilNode(7181, state_file=kept, state_interval=1) as node:
        ledger, sent = _run_one_round(node.url, node.dev_keys)
        block = ledger.w3.eth.block_number
        time.sleep(2.5)                               # at least one dump after the last block
        node.kill()
    with AnvilNode(7181, state_file=kept) as node:
        w3 = connect(node.url)
        assert w3.eth.block_number == block
        assert [(u.sender, u.digest) for u in LedgerClient(w3, ledger.address).updates(0)] == \
            [(s, d) for s, d, _ in sent]
    lost = tmp_path / "lost.json"
    with AnvilNode(7182, state_file=lost) as node:
        _run_one_round(node.url, node.dev_keys)
        node.kill()
    assert not lost.exists()                          # no clean stop, no interval: nothing written
    with pytest.raises(ValueError, match="state_file"):
        AnvilNode(7183, state_interval=1)
    with pytest.raises(ValueError, match="whole number"):
        AnvilNode(7183, state_file=kept, state_interval=0.5)


@pytest.mark.anvil
@needs_anvil
def test_two_senders_with_one_key_get_a_clear_nonce_error(monkeypatch):
    """Another process sent with the same account between our nonce read and our send: the node
    refuses the stale nonce and the client says what happened instead of a raw 'nonce too low'."""
    from medchain.chain import LedgerError
    with AnvilNode(7191) as node:
        admin, m = [Account.from_key(k) for k in node.dev_keys[:2]]
        w3 = connect(node.url)
        ledger = deploy_ledger(w3, admin, "cnn", INIT, 1, {}, members=[m.address], start=True)
        stale = w3.eth.get_transaction_count(admin.address) - 1
        real = w3.eth.get_transaction_count
        monkeypatch.setattr(w3.eth, "get_transaction_count",
                            lambda a, block="latest": stale if a == admin.address else real(a, block))
        with pytest.raises(LedgerError, match="same account") as info:
            ledger.add_member(Account.create().address)
        assert info.value.reason == "NonceConflict" and admin.address in str(info.value)
