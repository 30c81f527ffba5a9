"""Deployment-mode benchmark: institution processes (`medchain node`) over one anvil node, and
where a node's start-up time and memory go. Writes benchmarks/results/deploy.json.

    python benchmarks/bench_deploy.py                          # 1 node, then 5 nodes, 3 rounds
    python benchmarks/bench_deploy.py --processes 5 10 --rounds 5 --out /tmp/deploy.json

Three measurements:
* ``startup_profile``: one fresh interpreter walks a node's start-up path step by step (command
  line, torch, the chain client (web3, eth_account), medchain's modules, its data share, the model,
  one training round) and records CPU seconds, wall seconds, peak RSS and
  private memory after each step, plus the heavy packages it ended up importing;
* ``single_node``: one ``medchain node`` process against a task already started: launch → first
  training step (wall and CPU seconds), peak RSS, PSS — a node's own start-up, nothing to wait for;
* ``results`` (per N in --processes; one `medchain.node.Deployment` each: anvil with automine, a
  task with N members, started *before* the N processes are launched together, so each trains as
  soon as it is ready):
  - ``startup_s``: process start → first training step (the processes time-share the CPU: on a
    machine with fewer free cores than N this mostly measures contention — the load average is
    recorded next to it); ``startup_cpu_s``: CPU seconds each process used until then;
  - ``peak_rss_mb``: peak resident memory of each process (VmHWM; counts the shared
    torch library pages in every process), ``pss_mb``: proportional set size at the end (shared pages
    split among the processes sharing them, so the sum over processes counts them once), and the
    anvil node's peak RSS;
  - ``rounds_per_min`` (first round start → last exit) and ``rounds_per_min_steady`` (close of
    round 0 → close of the last round, median over processes), ``chain_overhead_pct`` (Σ JSON-RPC
    time / Σ busy time; waiting for the other institutions is excluded) and per node-round means
    of train / chain / wait seconds.

Model/data are tiny on purpose (the `cnn` on 12×12 two-class toy images, 40 training images per
institution) so that start-up and coordination, not training, are measured; the ~425 KB updates go
through a shared file blob store with only the digest on chain. One torch thread per process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from medchain.data import save_npz  # noqa: E402
from medchain.data.types import Dataset, ImageSet  # noqa: E402
from medchain.node import Deployment  # noqa: E402
from medchain.protocol import CollabConfig  # noqa: E402
from medchain.results import git_commit  # noqa: E402


def toy_dataset(n_inst: int, per_inst: int = 40, size: int = 12, seed: int = 0) -> Dataset:
    def split(n, s):
        rng = np.random.default_rng([seed, s])
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 100, (n, size, size))
        x[y == 1, 3:7, 3:7] += 60
        return ImageSet(np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64))
    return Dataset("toy", split(per_inst * n_inst, 1), split(10 * n_inst, 2), split(20 * n_inst, 3), 2, ["neg", "pos"])


# One fresh interpreter walks the node's start-up path (as medchain.cli.node._node and
# InstitutionNode.run do, with the in-memory ledger in place of the chain) and reports each step.
PROFILE_CHILD = r"""
import json, resource, sys, time
def usage():
    # VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark of the (torch-loaded) parent that forked us
    ru, hwm, priv = resource.getrusage(resource.RUSAGE_SELF), None, None
    for path, key in (("/proc/self/status", "VmHWM:"), ("/proc/self/smaps_rollup", "Private_Dirty:")):
        try:
            for line in open(path):
                if line.startswith(key):
                    value = round(int(line.split()[1]) / 1024, 1)
                    hwm, priv = (value, priv) if key == "VmHWM:" else (hwm, value)
        except OSError:
            pass
    return ru.ru_utime + ru.ru_stime, time.perf_counter(), hwm, priv
steps, last = [], usage()
def step(name):
    global last
    now = usage()
    steps.append({"step": name, "cpu_s": round(now[0] - last[0], 3), "wall_s": round(now[1] - last[1], 3),
                  "peak_rss_mb": now[2], "private_mb": now[3]})
    last = now
from medchain.cli import build_parser
args = build_parser("node").parse_args(["node", "--rpc", "http://127.0.0.1:1", "--ledger", "0x" + "11" * 20,
    "--key-env", "K", "--data", sys.argv[1], "--blobs", sys.argv[2], "--institutions", "5",
    "--institution-index", "0"])
step("python start-up, CLI parse")
import torch
step("import torch")
import web3, eth_account
from medchain.chain import LedgerClient, connect, key_from_env
step("import chain client (web3, eth_account)")
from medchain.blobstore import store_for
from medchain.node import load_institution, val_accuracy
from medchain.protocol import CollabConfig, Institution, MemoryLedger
step("import medchain modules")
cfg = CollabConfig(rounds=1, batch_size=32, lr=3e-3, model="cnn")
data, n_classes, _ = load_institution(args.data, args.partition, args.institutions, args.institution_index)
step("load data share")
inst = Institution(data, n_classes, cfg, MemoryLedger(b"\0" * 32, 1).as_account("a"), store_for(args.blobs))
step("build model")
delta = inst.train_round(0)
step("first training round")
inst.upload(0, delta)
inst.apply_round(0)
val_accuracy(inst.model, data.val)
step("upload, replay, ACC")
heavy = ("pandas", "matplotlib", "skimage", "sklearn", "scipy", "sympy", "torch._dynamo", "web3")
print(json.dumps({"steps": steps, "imported": [m for m in heavy if m in sys.modules]}))
"""


def startup_profile(src: str, workdir: Path) -> dict:
    """Run PROFILE_CHILD in a fresh interpreter (one torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROFILE_CHILD, src, str(workdir / "profile-blobs")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"startup profile failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["total_cpu_s"] = round(sum(s["cpu_s"] for s in out["steps"]), 3)
    out["total_wall_s"] = round(sum(s["wall_s"] for s in out["steps"]), 3)
    return out


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_one(n: int, rounds: int, workdir: Path, timeout: float) -> dict:
    """N node processes launched together against a task that is already started."""
    ds = toy_dataset(n)
    src = str(save_npz(ds, workdir / f"toy-{n}.npz"))
    cfg = CollabConfig(rounds=rounds, batch_size=32, lr=3e-3, model="cnn")
    load0 = os.getloadavg()[0]
    with Deployment(n, cfg, data=src, workdir=workdir / f"n{n}", persist_chain=False) as dep:
        dep.start_chain()
        dep.create_task(ds.n_channels, ds.n_classes, start=True)
        dep.launch()
        codes = dep.wait(timeout)
        if any(codes.values()):
            raise RuntimeError(f"N={n}: exit codes {codes}")
        rows, summary = dep.results(ds)
    rounds_rows = [r for r in rows if r.get("event") == "round"]
    finals = [m for p in dep.nodes for m in p.metrics() if m["event"] == "final"]
    mean = lambda k: round(statistics.fmean(r[k] for r in rounds_rows), 4)  # noqa: E731
    pss = [f["pss_mb"] for f in finals if f.get("pss_mb") is not None]
    rss = [f["peak_rss_mb"] for f in finals]
    return {
        "processes": n,
        "rounds": rounds,
        "startup_s": _spread([f["startup_s"] for f in finals]),
        "startup_cpu_s": _spread([f["startup_cpu_s"] for f in finals]),
        "ready_s": _spread([f["ready_s"] for f in finals]),
        "peak_rss_mb_per_process": _spread(rss),
        "peak_rss_mb_all_processes": round(sum(rss), 1),
        "pss_mb_per_process": _spread(pss) if pss else None,
        "pss_mb_all_processes": round(sum(pss), 1) if pss else None,
        "anvil_peak_rss_mb": summary["anvil_peak_rss_mb"],
        "rounds_per_min": summary["rounds_per_min"],
        "rounds_per_min_steady": summary["rounds_per_min_steady"],
        "round_s_steady": summary["round_s_steady"],
        "task_wall_s": summary["wall_s"],
        "chain_overhead_pct": summary["chain_overhead_pct"],
        "per_node_round_s": {"train": mean("train_s"), "chain": mean("chain_s"), "wait": mean("wait_s")},
        "all_nodes_agree": summary["all_nodes_agree"],
        "final_digest": summary["final_digest"],
        "load_avg_1min_before": round(load0, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, nargs="+", default=[5])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.json")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        tmp = Path(tmp)
        profile = startup_profile(str(save_npz(toy_dataset(5), tmp / "toy-profile.npz")), tmp)
        print(json.dumps(profile), flush=True)
        t0 = time.perf_counter()
        single = run_one(1, 1, tmp, args.timeout)
        single["bench_wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(single), flush=True)
        for n in args.processes:
            t0 = time.perf_counter()
            res = run_one(n, args.rounds, tmp, args.timeout)
            res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(res), flush=True)
            results.append(res)
    import torch
    out = {
        "benchmark": "deployment mode: institution processes over anvil; a node's start-up path",
        "model": "cnn (~106k parameters), 12x12 toy images, 40 training images per institution, 1 torch thread per process",
        "targets_issue_13": {"launch_to_first_training_step_s": 3.0, "peak_rss_mb_per_node": 300,
                             "five_nodes_together_mb": 1500},
        "startup_profile": profile,
        "single_node": single,
        "results": results,
        "reference_flower_1_42": "DESIGN.md: ~0.2 s coordination per round (~3%), 18-27 s launch to first training "
                                 "step, 1.5-1.9 GB peak over 11-14 processes (5 clients, PneumoniaMNIST)",
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(), "load_average_1min_end": round(os.getloadavg()[0], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
