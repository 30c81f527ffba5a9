"""`medchain train`: the centralized and local-only baselines from the command line.

With ``--out FILE.csv`` it writes a tidy table (one row per measurement: method, model_of,
eval_on, metric, value) and, beside it, ``FILE.json`` with the headline numbers, the parameters,
the seed, the data's provenance, package versions and the git commit.
"""
from __future__ import annotations

import os
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train the centralized and/or local-only baselines")
    p.add_argument("--data", default="simulated", help="data source (see `medchain data info`)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet | quantity | sites")
    p.add_argument("--institutions", type=int, default=5)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--fraction", type=float, default=1.0, help="keep this fraction of train data")
    p.add_argument("--mode", choices=["centralized", "local", "both"], default="both")
    p.add_argument("--model", default="cnn")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, metavar="FILE.csv",
                   help="write the tidy metrics here and the run's record (parameters, seed, data "
                        "provenance, versions) to FILE.json beside it; relative to the current folder")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def output_paths(out: Path) -> tuple[Path, Path]:
    """(csv, json) for ``--out``, checked before any training: the name ends in .csv, is not a
    folder, and its folder exists (it is created) and accepts a new file. Raises RuntimeError
    naming the problem and the fix."""
    out = Path(out).expanduser()
    if out.suffix.lower() != ".csv":
        raise RuntimeError(f"--out {out}: give a file name ending in .csv (e.g. --out results/train.csv); "
                           "the run's record is written beside it with the suffix .json")
    if out.is_dir():
        raise RuntimeError(f"--out {out} is a folder: give a file name ending in .csv inside it")
    folder = out.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"--out {out}: cannot create the folder {folder} ({exc.strerror or exc}); "
                           "choose an --out in a folder you can write to") from exc
    if not folder.is_dir():
        raise RuntimeError(f"--out {out}: {folder} is not a folder; choose an --out in a folder you can write to")
    probe = folder / f".medchain-write-test-{os.getpid()}"
    try:                      # os.access is not enough: root, read-only mounts, ACLs
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RuntimeError(f"--out {out}: cannot write to the folder {folder} ({exc.strerror or exc}); "
                           "choose an --out in a folder you can write to") from exc
    for path in (out, out.with_suffix(".json")):
        if path.exists() and not os.access(path, os.W_OK):
            raise RuntimeError(f"--out {out}: {path} exists and is not writable; remove it or choose another --out")
    return out, out.with_suffix(".json")


def run(args) -> int:
    paths = output_paths(args.out) if args.out is not None else None   # before loading or training

    import json

    import pandas as pd

    from medchain.baselines import centralized, local_only, mean_local_only
    from medchain.data import data_provenance, load_dataset, partition
    from medchain.results import tidy, write_metrics, write_summary
    from medchain.training import TrainConfig

    ds = load_dataset(args.data)
    n_inst = None if args.partition == "sites" else args.institutions
    insts = partition(ds, n_inst, args.partition, alpha=args.alpha, fraction=args.fraction, seed=args.seed)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      optimizer=args.optimizer, seed=args.seed)
    rows = []
    if args.mode in ("centralized", "both"):
        rows += centralized(insts, args.model, ds.n_classes, cfg, quiet=args.quiet).rows
    if args.mode in ("local", "both"):
        rows += local_only(insts, args.model, ds.n_classes, cfg, quiet=args.quiet).rows
    table = pd.DataFrame(rows)
    pooled = table[table.eval_on == "pooled"]
    print(pooled[["method", "model_of", "acc", "balanced_acc", "auc"]].to_string(index=False))
    summary = {}
    if args.mode in ("centralized", "both"):
        summary["centralized_acc"] = float(pooled[pooled.method == "centralized"].acc.iloc[0])
    if args.mode in ("local", "both"):
        summary["mean_local_only_acc"] = mean_local_only(rows)
    print(json.dumps(summary, indent=1))
    if paths is not None:
        csv_path, json_path = paths
        write_metrics(tidy(table), csv_path)
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("func", "command", "quiet")}
        summary.update({"institutions": len(insts), "config": cfg.to_dict(), "data": data_provenance(ds),
                        "metrics_csv": csv_path.name})
        write_summary(summary, json_path, params=params, seed=args.seed)
        print(f"wrote {csv_path} and {json_path}")
    return 0
