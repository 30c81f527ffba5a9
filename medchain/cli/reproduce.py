"""`medchain reproduce`: every figure of the paper from one command."""
from __future__ import annotations

import os
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="run the claim notebooks (papermill) and print each verdict")
    p.add_argument("--quick", action="store_true", help="small, fast settings (minutes on 2 cores)")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,03")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter for every selected notebook, value read as YAML; "
                        "repeatable, e.g. -p source=breastmnist -p 'partitions=[iid]'")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="notebooks run at once, one CPU core each (default: cores, at most 4)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from medchain.reproduce import REPO, parse_parameters, reproduce

    only = [k.strip().zfill(2) for k in args.only.split(",")] if args.only else None
    table = reproduce(quick=args.quick, only=only, out_dir=args.out or REPO / "results",
                      parameters=parse_parameters(args.param), jobs=args.jobs,
                      progress=not args.no_progress)
    print("\nclaim verdicts" + (" (quick mode)" if args.quick else ""))
    print(table.to_string(index=False, max_colwidth=90))
    return 0
