"""Where one seed of notebook 01 spends its CPU time: cProfile (CPU clock) of
``medchain.experiments.collaborative.run_seed`` on the simulated data set, iid partition, the
chain-free FedAvg reference on, one torch thread, the run cache off. Writes the cumulative CPU
seconds of the functions that matter (training, evaluation, BN recalibration, chain and replay)
next to the work the full-run estimate (medchain.costs) counts for the same settings.

    python benchmarks/profile_seed.py [--sim-n 3000] [--rounds 4] [--local-epochs 3] [--methods fedavg]
                                      [--out benchmarks/results/profile_seed.json]

cProfile adds its own overhead to every Python call (little to the torch kernels that dominate).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time
from pathlib import Path

os.environ.setdefault("MEDCHAIN_RUN_CACHE", "off")

import torch  # noqa: E402

from medchain.data import load_dataset  # noqa: E402
from medchain.experiments.collaborative import run_seed  # noqa: E402
from medchain.protocol import CollabConfig  # noqa: E402
from medchain.results import git_commit  # noqa: E402

#: function name → a piece of the file it lives in (cumulative CPU seconds are reported for these)
WATCH = {"train_epochs": "training", "evaluate": "training", "predict_proba": "training",
         "classification_metrics": "metrics", "recalibrate_bn": "training", "fit": "training",
         "run_collaborative": "protocol", "centralized": "baselines", "local_only": "baselines",
         "train_round": "protocol", "upload": "protocol", "sync_round": "protocol",
         "check_attestations": "protocol", "deploy_ledger": "ledger", "site_scores": "methods",
         "chain_cost": "methods"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim-n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--methods", default="fedavg")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_seed.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    commit, load0 = git_commit(), os.getloadavg()[0]
    c0 = time.process_time()
    ds = load_dataset(f"simulated:n={args.sim_n},sites=5,seed=0")
    data_cpu = time.process_time() - c0
    cfg = CollabConfig(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=32, lr=2e-3, model="cnn")
    methods = args.methods.split(",")
    prof = cProfile.Profile(time.process_time)
    c1 = time.process_time()
    prof.enable()
    run_seed(ds, "iid", cfg, seed=0, tolerance=0.02, institutions=5, chain="embedded",
             with_reference=True, methods=methods)
    prof.disable()
    total = time.process_time() - c1
    cum: dict[str, float] = {}
    for (file, _, name), (_, _, _, ct, _) in pstats.Stats(prof).stats.items():
        if name in WATCH and WATCH[name] in file:
            cum[name] = cum.get(name, 0.0) + ct
    n_train = len(ds.train)
    passes = args.rounds * args.local_epochs
    counted = n_train * passes * (len(methods) + 1 + 2)     # methods, the reference, centralized + local-only
    out = {"commit": commit, "load_average_1min_start": round(load0, 2),
           "settings": {"sim_n": args.sim_n, "partition": "iid", "rounds": args.rounds,
                        "local_epochs": args.local_epochs, "methods": methods, "with_reference": True},
           "data_cpu_s": round(data_cpu, 2), "run_seed_cpu_s": round(total, 2),
           "cumulative_cpu_s": {k: round(v, 2) for k, v in sorted(cum.items(), key=lambda kv: -kv[1])},
           "share_of_run_seed": {k: round(v / total, 3) for k, v in cum.items()
                                 if k in ("train_epochs", "evaluate", "recalibrate_bn", "sync_round", "upload",
                                          "chain_cost")},
           "training_images_counted_by_the_estimate": counted,
           "train_epochs_images_per_cpu_s": round(counted / cum["train_epochs"], 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
