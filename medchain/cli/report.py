"""`medchain report`: RESULTS.md from the committed summaries under results/."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("report", help="regenerate RESULTS.md from the summary.json files under results/")
    p.add_argument("--results", type=Path, default=None, help="folder to scan (default: the repository's results/)")
    p.add_argument("--out", type=Path, default=None, help="file to write (default: the repository's RESULTS.md)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 with a diff when the file differs from what the artifacts give")
    p.set_defaults(func=run)


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
