"""`medchain chain ...` (local nodes, node status) and `medchain ledger show` (a task ledger)."""
from __future__ import annotations

import argparse
import signal
import sys
import time

from medchain.cli._args import PORT as _port, POS_INT as _count


def register(subparsers) -> None:
    chain = subparsers.add_parser("chain", help="start local chains (anvil) and inspect nodes",
                                  description="Start local anvil chains and inspect Ethereum JSON-RPC nodes.")
    csub = chain.add_subparsers(dest="chain_command", required=True)

    up = csub.add_parser("up", help="start N local anvil nodes (one chain each) until Ctrl-C")
    up.add_argument("--chains", type=_count, default=1, metavar="N", help="number of chains (default 1)")
    up.add_argument("--base-chain-id", type=_count, default=31337,
                    help="chain id of the first chain; the others count up (default 31337)")
    up.add_argument("--state-dir", metavar="D", default=None,
                    help="keep each chain's state in D/chain-<id>.json (loaded on start, written on stop)")
    up.add_argument("--port", type=_port, default=None,
                    help="port of the first node; the others count up (default: free ports)")
    up.add_argument("--state-interval", type=_count, default=5, metavar="S",
                    help="with --state-dir, also write each chain's state every S seconds (default 5), so "
                         "a node killed without a clean stop loses at most S seconds of blocks")
    up.set_defaults(func=_chain_up)

    st = csub.add_parser("status", help="chain id, latest block and client version of a node")
    st.add_argument("url", help="JSON-RPC URL (http(s):// or ws(s)://)")
    st.set_defaults(func=_chain_status)

    ledger = subparsers.add_parser("ledger", help="inspect a task ledger contract",
                                   description="Inspect a TaskLedger contract on a node.")
    lsub = ledger.add_subparsers(dest="ledger_command", required=True)
    show = lsub.add_parser("show", help="task metadata, members, rounds, updates, attestations")
    show.add_argument("url", help="JSON-RPC URL of the node")
    show.add_argument("address", help="address of the TaskLedger contract")
    show.set_defaults(func=_ledger_show)


def _chain_up(args: argparse.Namespace) -> int:
    from medchain.chain.anvil import AnvilNode

    if args.chains < 1:
        raise ValueError("--chains must be at least 1")
    nodes = []
    try:
        for i in range(args.chains):
            cid = args.base_chain_id + i
            state = None
            if args.state_dir:
                from pathlib import Path
                state = Path(args.state_dir) / f"chain-{cid}.json"
            port = args.port + i if args.port else None
            nodes.append(AnvilNode(cid, port=port, state_file=state,
                                   state_interval=args.state_interval if state else None).start())
        for n in nodes:
            extra = f"  state {n.state_file} (every {n.state_interval:g} s and on stop)" if n.state_file else ""
            print(f"chain {n.chain_id}  {n.url}  {n.ws_url}{extra}", flush=True)
        print("development keys (public, for test chains only): anvil's default mnemonic "
              "'test test test test test test test test test test test junk'", flush=True)
        print("Ctrl-C to stop.", flush=True)
        stop = {"flag": False}

        def _on_term(signum, frame):  # noqa: ARG001
            stop["flag"] = True
        signal.signal(signal.SIGTERM, _on_term)
        while not stop["flag"]:
            for n in nodes:
                if not n.running:
                    kept = (f"; {n.state_file} holds its state as of its last dump (written every "
                            f"{n.state_interval:g} s)" if n.state_file else "; it kept no state (no --state-dir)")
                    raise RuntimeError(f"anvil node for chain {n.chain_id} exited unexpectedly{kept}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for n in nodes:
            n.stop()
        if nodes:
            print("stopped.", file=sys.stderr)
    return 0


def _chain_status(args: argparse.Namespace) -> int:
    from medchain.chain import connect, redact_url

    label = redact_url(args.url)
    try:
        w3 = connect(args.url, attempts=2)
    except ConnectionError as exc:
        print(f"node:      {label}\nreachable: no\n{exc}")
        return 1
    block = w3.eth.get_block("latest")
    try:
        version = w3.client_version
    except Exception:  # noqa: BLE001 - web3_clientVersion is optional
        version = "?"
    print(f"node:         {label}\nreachable:    yes\nchain id:     {w3.eth.chain_id}\n"
          f"client:       {version}\nlatest block: {block['number']} (0x{bytes(block['hash']).hex()})\n"
          f"gas limit:    {block['gasLimit']:,}")
    return 0


def _hex(b: bytes | None) -> str:
    return "-" if b is None else "0x" + bytes(b).hex()


def _print_policy(task) -> None:
    """The round policy the task's params record, by section (or why it cannot be read)."""
    import json

    from medchain.protocol import config_from_params, policy_sections

    params = dict(task.params)
    params.setdefault("rounds", int(task.n_rounds))
    try:
        sections = policy_sections(config_from_params(params, where="this task"))
    except (TypeError, ValueError) as exc:
        print(f"policy        not readable by this medchain version: {exc}")
        return
    for name, values in sections.items():
        text = "  ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
        print(f"policy {name:<10}{text}")


def _ledger_show(args: argparse.Namespace) -> int:
    from medchain.chain import LedgerClient, chain_identity, connect

    w3 = connect(args.url)
    ledger = LedgerClient(w3, args.address)
    t = ledger.task()
    print(f"ledger        {chain_identity(w3, ledger.address)}")
    print(f"admin         {t.admin}")
    print(f"model         {t.model_arch}   initial digest {_hex(t.initial_model_digest)}")
    deadline = f"{t.round_deadline_blocks} blocks" if t.round_deadline_blocks else "none"
    cap = "none" if t.max_samples == 2 ** 64 - 1 else f"{t.max_samples:,}"
    print(f"rounds        {t.n_rounds}   deadline {deadline}   quorum {t.quorum}   max samples per update {cap}")
    print(f"params        {t.params_json}")
    _print_policy(t)
    state = "finished" if t.finished else (f"running, round {t.current_round}" if t.started else "not started")
    print(f"state         {state}")
    members = ledger.members()
    print(f"members ({len(members)})")
    for m in members:
        print(f"  {m}")
    for info in ledger.rounds():
        close = info.close_block or "open"
        print(f"round {info.round}: blocks {info.open_block}..{close}, {info.submitted} update(s)"
              + (f", deadline block {info.deadline_block}" if info.deadline_block else ""))
        for u in ledger.updates(info.round):
            where = f"{u.payload_size:,} B inline" if u.payload_size else "payload in blob store"
            mark = "   <-- WITHDRAWN (member removed before the round closed)" if u.withdrawn else (
                "   <-- UNAVAILABLE (a majority of the members could not fetch its payload)" if u.unavailable else "")
            print(f"  update  {u.sender}  digest {_hex(u.digest)}  values {u.n_values:,}  samples "
                  f"{u.n_samples:,}  {where}  block {u.block_number}#{u.log_index}{mark}")
        atts = ledger.attestations(info.round)
        if atts:
            print(f"  majority digest {_hex(info.majority_digest)}  mismatches {info.mismatches}")
            for a in atts:
                mark = "" if a.agrees else "   <-- MISMATCH"
                print(f"  attest  {a.member}  {_hex(a.digest)}{mark}")
    return 0
