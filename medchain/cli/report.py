"""`medchain report`: RESULTS.md from the committed summaries under results/; `medchain verify`:
rerun one of them and check it."""
from __future__ import annotations

from pathlib import Path

from medchain.cli._args import POS_INT


def seed_list(text: str) -> list[int]:
    """"0,3" or "0-4" → [0, 3] / [0, 1, 2, 3, 4] (argparse type; the notebooks' rule)."""
    import argparse

    from medchain.experiments.seeds import parse_seeds

    try:
        return parse_seeds([int(x) for x in text.split(",")] if "-" not in text else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (e.g. --seeds 0,3 or --seeds 0-4)") from None


def register(sub) -> None:
    p = sub.add_parser("report", help="regenerate RESULTS.md from the summary.json files under results/")
    p.add_argument("--results", type=Path, default=None, help="folder to scan (default: the repository's results/)")
    p.add_argument("--out", type=Path, default=None, help="file to write (default: the repository's RESULTS.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 with a diff when the file differs from what the artifacts give")
    p.set_defaults(func=run)

    v = sub.add_parser("verify", help="rerun a committed run's seeds and check each number against its recorded interval",
                       description="Rerun the notebook of a run folder with its recorded parameters and compare "
                                   "every per-seed paired difference with the recording: identical on the same "
                                   "machine type and commit, else inside the recorded 95 % prediction interval. "
                                   "Exit 0 when verified, 1 when not.")
    v.add_argument("run", type=Path, help="run folder holding summary.json, e.g. "
                                          "results/full/breastmnist/01_centralized_vs_collaborative")
    v.add_argument("--seeds", type=seed_list, default=None,
                   help="comma-separated seeds to rerun (default: every recorded seed), e.g. 0 or 0,3")
    v.add_argument("--out", type=Path, default=None, help="folder for the rerun (default: results/verify/<run>/)")
    v.add_argument("--jobs", type=POS_INT, default=1, help="seeds run at once, one core each (default 1)")
    v.add_argument("--allow-dirty", action="store_true",
                   help="rerun from a tree with uncommitted changes (the comparison then says the code differs)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=run_verify)


def run(args) -> int:
    import sys

    from medchain import report
    from medchain.results import REPO

    root, out = args.results or REPO / "results", args.out or REPO / "RESULTS.md"
    if args.check:
        diff = report.check(root, out)
        if diff:
            print("\n".join(diff[:200]), file=sys.stderr)
            print(f"medchain: {out} is out of date with the artifacts under {root}: run `medchain report`",
                  file=sys.stderr)
            return 1
        print(f"{out} matches the artifacts under {root}")
        return 0
    print(f"wrote {report.write(root, out)}")
    return 0


def run_verify(args) -> int:
    from medchain.verify import verify

    result = verify(args.run, seeds=args.seeds, out_dir=args.out, jobs=args.jobs,
                    allow_dirty=args.allow_dirty, progress=not args.no_progress)
    print(result.text())
    print(f"rerun: {result.rerun_dir} (verify.json beside it)")
    return 0 if result.ok else 1
