"""The `medchain` command line. Each sub-command lives in its own module with a
`register(subparsers)` function that adds its parser and sets `func`.

Start-up is kept light: this module and the command modules import only argparse-level code at
the top, each command imports torch, web3, pandas or papermill inside its run function, and only
the module of the command being run registers its full parser (some registrations read defaults
from heavy modules); the others appear in `medchain --help` from the table below.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from medchain import __version__

#: command → (module under medchain.cli that registers it, its one-line help). Kept equal to what
#: the modules register by tests/test_cli.py; a module missing here is registered in full.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data", "simulate, download and inspect data sets"),
    "train": ("train", "train the centralized and/or local-only baselines"),
    "chain": ("chain", "start local chains (anvil) and inspect nodes"),
    "ledger": ("chain", "inspect a task ledger contract"),
    "reproduce": ("reproduce", "run the claim notebooks (papermill) and print each verdict"),
    "node": ("node", "run one institution of a task on a JSON-RPC node (deployment mode)"),
    "task": ("node", "create a collaborative task on a chain"),
    "simulate": ("node", "an anvil chain plus N institution processes on this machine"),
    "report": ("report", "regenerate RESULTS.md from the summary.json files under results/"),
    "verify": ("report", "rerun a committed run's seeds and check each number against its recorded interval"),
}

#: Errors raised while a command runs that medchain words for the user (they name the problem
#: and the fix): printed as one line on stderr, exit status 1. Usage errors stay argparse's (2).
RUNTIME_ERRORS = (RuntimeError, OSError, ValueError)   # OSError covers ConnectionError, FileNotFoundError


def command_modules() -> list[str]:
    """Names of the modules under medchain.cli that provide sub-commands: the table's, then any
    other module of this package (found without importing it)."""
    known = list(dict.fromkeys(module for module, _ in COMMANDS.values()))
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return known + [m for m in found if m not in known]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `medchain` parser. command=None registers every command in full; otherwise only the
    module providing `command` (and modules missing from COMMANDS) register in full, the others
    get a placeholder with their help line, which is all `medchain --help` shows."""
    parser = argparse.ArgumentParser(
        prog="medchain", description="Collaborative training of medical image classifiers coordinated "
                                     "by blockchains: data, baselines, chains, ledgers, nodes, notebooks.")
    parser.add_argument("--version", action="version", version=f"medchain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = None if command is None else COMMANDS.get(command, (None,))[0]
    for module in command_modules():
        names = [name for name, (mod, _) in COMMANDS.items() if mod == module]
        if command is None or module == wanted or not names:
            importlib.import_module(f"medchain.cli.{module}").register(sub)
        else:
            for name in names:
                sub.add_parser(name, help=COMMANDS[name][1], add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `medchain <argv>`: 0 on success, 1 on a runtime error (message on stderr), 2 on a
    usage error (argparse exits with SystemExit(2))."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top-level parser has no options that take values, so the first word is the command.
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RUNTIME_ERRORS as exc:
        # Errors raised by medchain name the problem and the fix; show them without a traceback.
        print(f"medchain: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
