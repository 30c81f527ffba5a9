"""Training throughput and the cost of one collaborative round, split by phase.

Writes benchmarks/results/protocol.json:
- training images/s of the default `cnn` (and `cnn_small`) on this machine's CPU threads;
- per round: seconds of local training, encoding, chain transactions and replay/aggregation, on the
  embedded eth-tester chain, on an anvil node, and without a chain (the FedAvg reference), plus the
  chain overhead in % of the round.

    python benchmarks/bench_protocol.py [--out FILE] [--rounds 3] [--n 1500]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from medchain.data import load_dataset, partition
from medchain.models import build_model
from medchain.protocol import CollabConfig, run_collaborative
from medchain.results import versions
from medchain.training import TrainConfig, train_epochs


def training_throughput(ds, model_name: str, seconds_min: float = 5.0) -> float:
    model = build_model(model_name, 1, ds.n_classes, 0)
    cfg = TrainConfig(epochs=1, batch_size=32)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds_min:
        train_epochs(model, ds.train, cfg)
        n += len(ds.train)
    return n / (time.perf_counter() - t0)


def round_split(insts, n_classes, cfg, chain) -> dict:
    res = run_collaborative(insts, n_classes, cfg, chain=chain)
    per_round = {k: v / cfg.rounds for k, v in res.timings.items()}
    wall = res.wall_s / cfg.rounds
    return {"chain": chain or "none", "rounds": cfg.rounds, "wall_s_per_round": wall,
            "seconds_per_round": per_round, "chain_overhead_pct": 100 * per_round["chain"] / wall,
            "final_digest": res.final_digest.hex()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "protocol.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1500)
    args = ap.parse_args()
    ds = load_dataset(f"simulated:n={args.n},sites=5,seed=0")
    out = {"benchmark": "training and collaborative rounds", "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "versions": versions(), "n_images": args.n,
           "load_average_at_start": os.getloadavg()[0],
           "training_images_per_s": {m: training_throughput(ds, m) for m in ("cnn", "cnn_small")}}
    insts = partition(ds, 5, "iid", seed=0)
    cfg = CollabConfig(rounds=args.rounds, local_epochs=1)
    splits = [round_split(insts, ds.n_classes, cfg, None), round_split(insts, ds.n_classes, cfg, "embedded")]
    try:
        from medchain.chain.anvil import AnvilNode
        with AnvilNode(chain_id=7301) as node:
            splits.append(round_split(insts, ds.n_classes, cfg, node.url))
    except FileNotFoundError as exc:       # no anvil binary: run `npm ci` in contracts/
        out["anvil_skipped"] = str(exc)
    out["rounds"] = splits
    out["digests_equal_across_chains"] = len({s["final_digest"] for s in splits}) == 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
