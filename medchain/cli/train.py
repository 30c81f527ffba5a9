"""`medchain train`: the centralized and local-only baselines from the command line."""
from __future__ import annotations

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
    p.add_argument("--out", type=Path, default=None, help="folder for metrics.csv and summary.json")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    import pandas as pd

    from medchain.baselines import centralized, local_only, mean_local_only
    from medchain.data import load_dataset, partition
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
    summary = {"data": ds.source, "partition": args.partition, "institutions": len(insts),
               "config": cfg.to_dict(), "model": args.model}
    if args.mode in ("centralized", "both"):
        summary["centralized_acc"] = float(pooled[pooled.method == "centralized"].acc.iloc[0])
    if args.mode in ("local", "both"):
        summary["mean_local_only_acc"] = mean_local_only(rows)
    print(json.dumps({k: v for k, v in summary.items() if k.endswith("acc")}, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "metrics.csv", index=False)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0
