"""Deployment-mode benchmark: N institution processes (`medchain node`) over one anvil node.
Writes benchmarks/results/deploy.json.

    python benchmarks/bench_deploy.py                      # 5, 10 and 20 processes, 5 rounds each
    python benchmarks/bench_deploy.py --processes 5 --rounds 3 --out /tmp/deploy.json

What is measured, per N (one `medchain.node.Deployment` each: anvil with automine, a task with N
members, N processes started together; the task starts once every process is ready):
* ``rounds_per_min``: rounds / (task start → last process exit) × 60; ``rounds_per_min_steady``:
  from the close of round 0 to that of the last round (median over processes), i.e. without the
  first round's and the exit's one-off costs;
* ``chain_overhead_pct``: Σ chain time / Σ busy time over all processes, where chain time is every
  JSON-RPC call (submit, reads, log queries, attestations, close) and busy time adds local training,
  encoding, replay/aggregation and evaluation; time spent waiting for the other institutions is
  excluded. Also per node-round means of train / chain / wait seconds;
* ``ready_s``: process start → task read, data loaded, model built and optimizer warmed up;
  ``startup_s``: process start → first training step (includes waiting for the slowest process,
  since the task starts when all are ready);
* ``peak_rss_mb``: peak resident memory of each process (``ru_maxrss``), and of the anvil node.

Model/data are tiny on purpose (the `cnn` on 12×12 two-class toy images, 40 training images per
institution) so that the coordination cost, not training, is what grows with N; the ~425 KB updates
go through a shared file blob store with only the digest on chain. Every process trains with one
torch thread; on a machine with fewer cores than processes the processes time-share the CPU, so
``rounds_per_min`` mostly measures CPU contention — the load average is recorded next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def toy_dataset(n_inst: int, per_inst: int = 40, size: int = 12, seed: int = 0) -> Dataset:
    def split(n, s):
        rng = np.random.default_rng([seed, s])
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 100, (n, size, size))
        x[y == 1, 3:7, 3:7] += 60
        return ImageSet(np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64))
    return Dataset("toy", split(per_inst * n_inst, 1), split(10 * n_inst, 2), split(20 * n_inst, 3), 2, ["neg", "pos"])


def run_one(n: int, rounds: int, workdir: Path, timeout: float) -> dict:
    ds = toy_dataset(n)
    src = str(save_npz(ds, workdir / f"toy-{n}.npz"))
    cfg = CollabConfig(rounds=rounds, batch_size=32, lr=3e-3, model="cnn")
    load0 = os.getloadavg()[0]
    with Deployment(n, cfg, data=src, workdir=workdir / f"n{n}", persist_chain=False) as dep:
        dep.start_chain()
        dep.create_task(ds.n_channels, ds.n_classes)
        t_launch = time.time()
        dep.launch()
        dep.start_task(ready_timeout=timeout)
        t_start = time.time()
        codes = dep.wait(timeout)
        if any(codes.values()):
            raise RuntimeError(f"N={n}: exit codes {codes}")
        rows, summary = dep.results(ds)
    rounds_rows = [r for r in rows if r.get("event") == "round"]
    finals = [m for p in dep.nodes for m in p.metrics() if m["event"] == "final"]
    rss = [f["peak_rss_mb"] for f in finals]
    ready = [f["ready_s"] for f in finals]
    first = [f["startup_s"] for f in finals]
    mean = lambda k: round(statistics.fmean(r[k] for r in rounds_rows), 4)  # noqa: E731
    return {
        "processes": n,
        "rounds": rounds,
        "rounds_per_min": summary["rounds_per_min"],
        "rounds_per_min_steady": summary["rounds_per_min_steady"],
        "round_s_steady": summary["round_s_steady"],
        "task_wall_s": summary["wall_s"],
        "chain_overhead_pct": summary["chain_overhead_pct"],
        "per_node_round_s": {"train": mean("train_s"), "chain": mean("chain_s"), "wait": mean("wait_s")},
        "ready_s": {"min": min(ready), "median": statistics.median(ready), "max": max(ready)},
        "launch_to_all_ready_s": round(t_start - t_launch, 2),
        "startup_to_first_train_s": {"median": statistics.median(first), "max": max(first)},
        "peak_rss_mb_per_process": {"min": min(rss), "median": statistics.median(rss), "max": max(rss)},
        "peak_rss_mb_all_processes": round(sum(rss), 1),
        "anvil_peak_rss_mb": summary["anvil_peak_rss_mb"],
        "all_nodes_agree": summary["all_nodes_agree"],
        "final_digest": summary["final_digest"],
        "load_avg_1min_before": round(load0, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy.json")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        for n in args.processes:
            t0 = time.perf_counter()
            res = run_one(n, args.rounds, Path(tmp), args.timeout)
            res["bench_wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(res), flush=True)
            results.append(res)
    import torch
    out = {
        "benchmark": "deployment mode: institution processes over anvil",
        "model": "cnn (~106k parameters), 12x12 toy images, 40 training images per institution, 1 torch thread per process",
        "results": results,
        "reference_flower_1_42": "DESIGN.md: ~0.2 s coordination per round (~3%), 18-27 s launch to first training "
                                 "step, 1.5-1.9 GB peak over 11-14 processes (5 clients, PneumoniaMNIST)",
        "python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
