"""The committed contract artifacts match the Solidity sources and the pinned compiler."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ROOT / "contracts"
ARTIFACTS = ROOT / "medchain" / "artifacts"
NAMES = sorted(p.stem for p in ARTIFACTS.glob("*.json"))


def test_every_source_has_an_artifact():
    sources = sorted(p.stem for p in CONTRACTS.glob("*.sol"))
    assert sources and sources == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_artifact_matches_source_text(name):
    """Cheap check without node: the artifact was compiled from the current source text."""
    art = json.loads((ARTIFACTS / f"{name}.json").read_text())
    source = (CONTRACTS / f"{name}.sol").read_text(encoding="utf-8")
    assert art["sourceSha256"] == hashlib.sha256(source.encode()).hexdigest(), (
        f"contracts/{name}.sol changed since medchain/artifacts/{name}.json was compiled: run "
        "`node compile.js` in contracts/ and commit the artifact")
    pinned = json.loads((CONTRACTS / "package.json").read_text())["dependencies"]["solc"]
    assert art["compiler"]["version"].startswith(pinned + "+")
    assert art["settings"]["evmVersion"] == "cancun"


@pytest.mark.solc
def test_recompile_is_byte_identical(tmp_path):
    if not (CONTRACTS / "node_modules" / "solc" / "package.json").is_file():
        pytest.skip("contracts/node_modules/solc is not installed (run `npm install` in contracts/)")
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    installed = json.loads((CONTRACTS / "node_modules" / "solc" / "package.json").read_text())["version"]
    pinned = json.loads((CONTRACTS / "package.json").read_text())["dependencies"]["solc"]
    assert installed == pinned, f"contracts/node_modules has solc {installed}, package.json pins {pinned}"
    proc = subprocess.run([node, "compile.js", "--out", str(tmp_path)], cwd=CONTRACTS,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in NAMES:
        committed = json.loads((ARTIFACTS / f"{name}.json").read_text())
        fresh = json.loads((tmp_path / f"{name}.json").read_text())
        for key in ("bytecode", "deployedBytecode", "abi", "compiler", "settings", "sourceSha256"):
            assert fresh[key] == committed[key], f"{name}.json: {key} differs from a fresh compile"
