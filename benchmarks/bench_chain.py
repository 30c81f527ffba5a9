"""Chain-ledger benchmark: gas per update, transactions per second, and the time to read one
round's updates as the chain grows. Writes benchmarks/results/chain.json.

    python benchmarks/bench_chain.py            # full (a few minutes on 2 CPU cores)
    python benchmarks/bench_chain.py --quick    # smaller chains and fewer transactions

What is measured
* gas used by ``submitUpdate`` with an incompressible (random) payload of 0 B (digest only),
  1 KB, 8 KB and 100 KB, on anvil and on the embedded eth-tester chain (an update that does not
  close its round; the closing update, which also opens the next round, is reported apart);
* end-to-end ledger transactions per second through ``LedgerClient.submit_update`` (simulate,
  sign locally, send, wait for the receipt), 1 KB payload, one member, one round per transaction;
* the time of ``LedgerClient.updates(r)`` for the last round of an eth-tester chain of about
  10, 100 and 1,000 blocks filled with real rounds (3 members, 1 KB updates): the bounded block range
  [roundOpenBlock, roundCloseBlock] against an unbounded whole-chain ``eth_getLogs`` (up to 100 blocks;
  it grows roughly quadratically with the chain, see DESIGN.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eth_account import Account  # noqa: E402

from medchain.chain import LedgerClient, connect, deploy_ledger, embedded_accounts  # noqa: E402
from medchain.chain.anvil import AnvilNode, AnvilNotFound, find_anvil  # noqa: E402

SIZES = [0, 1024, 8192, 100_000]
INIT = hashlib.sha256(b"bench").digest()


def _payload(size: int, seed: int) -> bytes:
    rng = hashlib.sha256(f"{seed}".encode()).digest()
    out = bytearray()
    while len(out) < size:
        rng = hashlib.sha256(rng).digest()
        out += rng
    return bytes(out[:size])


def gas_per_update(w3, accounts) -> list[dict]:
    """Gas of one update that does not close its round (two members; the second, digest-only
    update closes the round and opens the next: reported separately as closing_update_gas)."""
    admin, m1, m2 = accounts[0], accounts[1], accounts[2]
    ledger = deploy_ledger(w3, admin, "bench", INIT, len(SIZES), {}, members=[m1.address, m2.address],
                           start=True)
    c1, c2 = ledger.as_account(m1), ledger.as_account(m2)
    rows = []
    for r, size in enumerate(SIZES):
        p = _payload(size, r)
        receipt = c1.submit_update(r, hashlib.sha256(p).digest(), size // 4, 100, p)
        closing = c2.submit_update(r, hashlib.sha256(b"other").digest(), 1, 100)
        rows.append({"payload_bytes": size, "gas_used": int(receipt["gasUsed"]),
                     "closing_update_gas": int(closing["gasUsed"])})
    return rows


def tx_rate(w3, accounts, n: int) -> dict:
    admin, member = accounts[0], accounts[1]
    ledger = deploy_ledger(w3, admin, "bench", INIT, n, {}, members=[member.address], start=True)
    client = ledger.as_account(member)
    p = _payload(1024, 7)
    d = hashlib.sha256(p).digest()
    t0 = time.perf_counter()
    for r in range(n):
        client.submit_update(r, d, 256, 100, p)
    dt = time.perf_counter() - t0
    return {"transactions": n, "seconds": round(dt, 3), "tx_per_s": round(n / dt, 1),
            "payload_bytes": 1024}


def read_vs_length(targets: list[int], unbounded_max: int, repeats: int = 5) -> list[dict]:
    """One growing eth-tester chain; measure when it passes each target length."""
    w3 = connect()
    accts = embedded_accounts(w3)
    admin, members = accts[0], accts[1:4]
    ledger = deploy_ledger(w3, admin, "bench", INIT, 10_000, {}, members=[m.address for m in members],
                           start=True)
    clients = [ledger.as_account(m) for m in members]
    rows = []
    r = 0
    t_build = time.perf_counter()
    for target in sorted(targets):
        while w3.eth.block_number < target:
            for i, c in enumerate(clients):
                p = _payload(1024, r * 10 + i)
                c.submit_update(r, hashlib.sha256(p).digest(), 256, 100, p)
            r += 1
        last = r - 1
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ups = ledger.updates(last)
            times.append(time.perf_counter() - t0)
        assert len(ups) == 3
        row = {"chain_blocks": int(w3.eth.block_number), "rounds": r, "round_read": last,
               "updates": len(ups), "bounded_read_s_median": round(sorted(times)[len(times) // 2], 4),
               "bounded_read_s_max": round(max(times), 4),
               "build_s_so_far": round(time.perf_counter() - t_build, 1)}
        if target <= unbounded_max:
            t0 = time.perf_counter()
            logs = w3.eth.get_logs({"address": ledger.address, "fromBlock": 0, "toBlock": "latest"})
            row["unbounded_get_logs_s"] = round(time.perf_counter() - t0, 4)
            row["unbounded_logs"] = len(logs)
        rows.append(row)
        print(f"  read at {row['chain_blocks']} blocks: {row['bounded_read_s_median'] * 1000:.1f} ms "
              f"(bounded)" + (f", {row['unbounded_get_logs_s']:.2f} s unbounded" if "unbounded_get_logs_s"
                              in row else ""), flush=True)
    return rows


def anvil_read(n_blocks: int) -> dict:
    with AnvilNode(7301) as node:
        w3 = connect(node.url)
        accts = [Account.from_key(k) for k in node.dev_keys[:4]]
        ledger = deploy_ledger(w3, accts[0], "bench", INIT, 10_000, {},
                               members=[a.address for a in accts[1:]], start=True)
        clients = [ledger.as_account(a) for a in accts[1:]]
        r = 0
        while w3.eth.block_number < n_blocks:
            for i, c in enumerate(clients):
                p = _payload(1024, r * 10 + i)
                c.submit_update(r, hashlib.sha256(p).digest(), 256, 100, p)
            r += 1
        t0 = time.perf_counter()
        ups = LedgerClient(w3, ledger.address).updates(r - 1)
        return {"chain_blocks": int(w3.eth.block_number), "updates": len(ups),
                "bounded_read_s": round(time.perf_counter() - t0, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chain.json"))
    args = ap.parse_args(argv)
    n_tx = 50 if args.quick else 200
    lengths = [10, 100] if args.quick else [10, 100, 1000]

    import web3
    result: dict = {
        "benchmark": "chain ledger",
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "versions": {"web3": web3.__version__},
        "notes": ("payloads are random bytes (incompressible, like float32 updates); gas on anvil is "
                  "what a real node charges. eth-tester charges the same, but its gas *estimates* "
                  "ignore the EIP-7623 calldata floor, which the client adds itself."),
    }
    try:
        import eth_tester
        result["versions"]["eth_tester"] = eth_tester.__version__ if hasattr(eth_tester, "__version__") else "?"
    except Exception:  # noqa: BLE001
        pass

    print("eth-tester: gas per update", flush=True)
    w3 = connect()
    accts = embedded_accounts(w3)
    result["gas_eth_tester"] = gas_per_update(w3, accts)
    print("eth-tester: tx/s", flush=True)
    result["tx_rate_eth_tester"] = tx_rate(connect(), embedded_accounts(w3), n_tx)
    print(f"  {result['tx_rate_eth_tester']['tx_per_s']} tx/s", flush=True)

    try:
        find_anvil()
        have_anvil = True
    except AnvilNotFound as exc:
        have_anvil = False
        result["anvil"] = f"skipped: {exc}"
    if have_anvil:
        with AnvilNode(7300) as node:
            result["versions"]["anvil"] = connect(node.url).client_version
            keys = [Account.from_key(k) for k in node.dev_keys[:3]]
            print("anvil: gas per update", flush=True)
            result["gas_anvil"] = gas_per_update(connect(node.url), keys)
            print("anvil: tx/s", flush=True)
            result["tx_rate_anvil"] = tx_rate(connect(node.url), keys, n_tx * 2)
            print(f"  {result['tx_rate_anvil']['tx_per_s']} tx/s", flush=True)
        result["read_anvil"] = anvil_read(lengths[-1])

    print("eth-tester: read one round vs chain length", flush=True)
    result["read_vs_chain_length_eth_tester"] = read_vs_length(lengths, unbounded_max=100)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("gas", "tx_rate", "read"))}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
