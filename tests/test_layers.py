"""The package's layering: the import-linter contracts in pyproject.toml hold (and do catch a
violation), and the chain-free protocol runs without loading the chain client or web3."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_import_linter = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None,
    reason="import-linter is not installed: pip install -e '.[test]' (or `make venv`)")


def _lint_imports(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the venv's lint-imports on cwd/pyproject.toml, with no cache written into the tree."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                           "import sys; from importlinter.cli import lint_imports_command as c; "
                                           "sys.exit(c())"]
    return subprocess.run([*cmd, "--no-cache", str(cwd / "pyproject.toml")], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@needs_import_linter
def test_import_contracts_are_kept():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "3 kept" in proc.stdout, proc.stdout[-2000:]


@needs_import_linter
def test_each_contract_catches_a_violation(tmp_path):
    """A copy of the package with one offending module per contract breaks all three."""
    shutil.copytree(ROOT / "medchain", tmp_path / "medchain", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "medchain" / "_probe_cli.py").write_text("from medchain.cli import main\n")
    (tmp_path / "medchain" / "data" / "_probe_layer.py").write_text("import medchain.protocol\n")
    (tmp_path / "medchain" / "chain" / "_probe_torch.py").write_text("import torch\n")
    proc = _lint_imports(tmp_path, {"PYTHONPATH": str(tmp_path)})   # the copy, not the installed package
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 kept, 3 broken" in proc.stdout, proc.stdout[-4000:]
    for probe in ("medchain._probe_cli", "medchain.data._probe_layer", "medchain.chain._probe_torch"):
        assert probe in proc.stdout


CHAIN_FREE = r"""
import json, sys
import numpy as np
import medchain.protocol as protocol
after_import = sorted(m for m in sys.modules if m.startswith(("web3", "eth_", "medchain.chain")))
from medchain.data.types import ImageSet, InstitutionData

def toy(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = rng.integers(0, 100, (n, 28, 28)).astype(np.uint8)
    x[y == 1, 4:12, 4:12] += 120
    return ImageSet(x, y)

insts = [InstitutionData(i, toy(40, 10 * i), toy(12, 10 * i + 1), toy(16, 10 * i + 2)) for i in range(2)]
cfg = protocol.CollabConfig(rounds=1, local_epochs=1, batch_size=16, model="lenet")
res = protocol.run_collaborative(insts, 2, cfg, chain=None)
after_run = sorted(m for m in sys.modules if m.startswith(("web3", "eth_", "medchain.chain")))
ups = res.institutions[0].ledger.updates(0)
print(json.dumps({"after_import": after_import, "after_run": after_run, "address": res.ledger_address,
                  "rounds": len(res.history), "digest": res.final_digest.hex(), "acc": res.history[-1]["acc"],
                  "updates": [type(u).__module__ for u in ups]}))
"""


def test_chain_free_protocol_loads_no_chain_client_nor_web3():
    proc = subprocess.run([sys.executable, "-c", CHAIN_FREE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["after_import"] == [], f"import medchain.protocol loaded {out['after_import']}"
    assert out["after_run"] == [], f"a chain-free run loaded {out['after_run']}"
    assert out["address"] == "memory" and out["rounds"] == 1 and len(out["digest"]) == 64
    assert 0.0 <= out["acc"] <= 1.0
    assert out["updates"] == ["medchain.records", "medchain.records"]


def test_chain_ledger_re_exports_the_records():
    import medchain.chain as chain
    import medchain.chain.ledger as ledger
    import medchain.records as records
    for name in records.__all__:
        assert getattr(ledger, name) is getattr(records, name) is getattr(chain, name)
