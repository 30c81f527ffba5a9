"""`medchain reproduce`: every figure of the paper from one command."""
from __future__ import annotations

import os
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="run the claim notebooks (papermill) and print each verdict")
    p.add_argument("--quick", action="store_true", help="small, fast settings (minutes on 2 cores); without it "
                   "the run's estimated cost (hours) is printed before it starts")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,03")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter for every selected notebook, value read as YAML; "
                        "repeatable, e.g. -p source=breastmnist -p 'partitions=[iid]'")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="notebooks run at once, one CPU core each (default: cores, at most 4)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def print_estimate(only: list[str] | None, parameters: dict, jobs: int) -> None:
    """Before a full run: its estimated cost per notebook and in total (medchain.costs.estimate).
    A missing benchmark result only leaves the estimate out."""
    from medchain.costs import estimate, format_estimate, measured_rates
    from medchain.reproduce import list_notebooks

    books = list_notebooks()
    keys = [k for k in (only or books) if k in books]
    try:
        rates = measured_rates()
    except FileNotFoundError as exc:
        print(f"no cost estimate: {exc}", flush=True)
        return
    print(format_estimate(estimate(books, keys, parameters, rates), rates, jobs), flush=True)


def run(args) -> int:
    from medchain.reproduce import REPO, parse_parameters, reproduce

    only = [k.strip().zfill(2) for k in args.only.split(",")] if args.only else None
    parameters = parse_parameters(args.param)
    if not args.quick:
        print_estimate(only, parameters, args.jobs)
    table = reproduce(quick=args.quick, only=only, out_dir=args.out or REPO / "results",
                      parameters=parameters, jobs=args.jobs, progress=not args.no_progress)
    print("\nclaim verdicts" + (" (quick mode)" if args.quick else ""))
    print(table.to_string(index=False, max_colwidth=90))
    return 0
