"""The `medchain` command: light start-up (no torch/web3/pandas for --help, --version and the light
commands' help), the command table equal to what the modules register, and exit codes (1 for a
runtime error with its message on stderr, 2 for a usage error)."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

import medchain
from medchain import cli

HEAVY = ("torch", "web3", "pandas", "papermill", "sklearn", "matplotlib")


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m medchain <argv>`: the entry point the simulator's node processes start through."""
    return subprocess.run([sys.executable, "-m", "medchain", *argv], capture_output=True, text=True, timeout=120)


def _heavy_modules_imported(*argv: str) -> list[str]:
    """Run `medchain <argv>` in a fresh interpreter and list the HEAVY modules it imported."""
    code = ("import json, sys\nfrom medchain.cli import main\n"
            f"try:\n    main({list(argv)!r})\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_and_version_work_in_a_fresh_process():
    proc = _run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for name in cli.COMMANDS:
        assert name in proc.stdout
    proc = _run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"medchain {medchain.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["data", "--help"], ["train", "--help"],
                                  ["reproduce", "--help"], ["chain", "--help"], ["ledger", "show", "--help"],
                                  ["report", "--help"], ["verify", "--help"]])
def test_help_imports_no_heavy_module(argv):
    assert _heavy_modules_imported(*argv) == []


@pytest.mark.parametrize("argv", [["node", "--help"], ["task", "--help"], ["task", "create", "--help"],
                                  ["simulate", "--help"]])
def test_node_commands_help_imports_no_heavy_module(argv):
    assert _heavy_modules_imported(*argv) == []


def test_node_commands_training_defaults_are_collab_configs():
    """The literal defaults cli/node.py registers (so that --help stays light) equal CollabConfig's,
    and the options parsed with no value give CollabConfig() itself."""
    from dataclasses import fields

    from medchain.cli import node as cli_node
    from medchain.protocol import CollabConfig

    defaults = {f.name: f.default for f in fields(CollabConfig)}
    for name, value in cli_node.TRAINING_DEFAULTS.items():
        assert name in defaults, f"TRAINING_DEFAULTS[{name!r}] is no CollabConfig field"
        assert value == defaults[name] and type(value) is type(defaults[name]), \
            f"update TRAINING_DEFAULTS[{name!r}] in medchain/cli/node.py to {defaults[name]!r}"
    args = cli.build_parser("task").parse_args(
        ["task", "create", "--rpc", "http://x", "--key-env", "K", "--members", "0x1"])
    assert cli_node._config(args) == CollabConfig(rounds=20)
    registered = {name for name in defaults if hasattr(args, name)}
    assert registered - {"rounds"} == set(cli_node.TRAINING_DEFAULTS)


def test_command_table_matches_what_the_modules_register():
    """COMMANDS (used to list commands without importing them) equals the full registration."""
    full = cli.build_parser()
    action = next(a for a in full._actions if a.dest == "command")
    registered = {a.dest: a.help for a in action._choices_actions}
    for name, (_, help_line) in cli.COMMANDS.items():
        assert registered.get(name) == help_line, f"update COMMANDS[{name!r}] in medchain/cli/__init__.py"
    for module in set(m for m, _ in cli.COMMANDS.values()):
        p = argparse.ArgumentParser()
        importlib.import_module(f"medchain.cli.{module}").register(p.add_subparsers())
        names = set(p._subparsers._group_actions[0].choices)
        assert names == {n for n, (m, _) in cli.COMMANDS.items() if m == module}, module


def test_lazy_parser_registers_only_the_command_being_run():
    parser = cli.build_parser("data")
    args = parser.parse_args(["data", "simulate", "--out", "x.npz"])
    assert args.func.__module__ == "medchain.cli.data" and args.n == 10000
    action = next(a for a in parser._actions if a.dest == "command")
    assert set(action.choices) >= set(cli.COMMANDS)      # the others are listed all the same


@pytest.mark.parametrize("exc", [RuntimeError("node gone: restart it"), ConnectionError("no node at url"),
                                 OSError("disk full"), FileNotFoundError("no such file"),
                                 ValueError("bad value: use 3")])
def test_runtime_errors_exit_1_with_the_message_on_stderr(exc, monkeypatch, capsys):
    from medchain.cli import data as cli_data

    def boom(args):
        raise exc
    monkeypatch.setattr(cli_data, "run_info", boom)
    assert cli.main(["data", "info", "simulated"]) == 1
    err = capsys.readouterr().err
    assert err == f"medchain: error: {exc}\n"


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch):
    from medchain.cli import data as cli_data

    def bug(args):
        raise KeyError("internal")
    monkeypatch.setattr(cli_data, "run_info", bug)
    with pytest.raises(KeyError):
        cli.main(["data", "info", "simulated"])


def test_real_runtime_error_and_usage_errors_in_a_fresh_process(tmp_path):
    proc = _run_cli("data", "info", str(tmp_path / "missing.npz"), "--no-download")
    assert proc.returncode == 1
    assert proc.stderr.startswith("medchain: error: ") and "missing.npz" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    for argv in (["train", "--epochs", "x"], ["no-such-command"], []):
        proc = _run_cli(*argv)
        assert proc.returncode == 2, argv
        assert "usage: medchain" in proc.stderr
