"""The `medchain` command line. Each sub-command lives in its own module with a
`register(subparsers)` function that adds its parser and sets `func`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules under medchain.cli that provide sub-commands (each has register(subparsers)).
_COMMAND_MODULES = ["data", "train", "chain", "reproduce", "node"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medchain", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version",
                        version=f"medchain {importlib.import_module('medchain').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"medchain.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as exc:
        # Errors raised by medchain name the problem and the fix; show them without a traceback.
        print(f"medchain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
