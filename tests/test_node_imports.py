"""A deployment node process stays light: what `medchain node` imports up to and through its first
round (parse the command line, connect-side modules, load its share of the data, build the model,
train, encode and upload, replay the round, log the ACC) loads no pandas,
matplotlib, scikit-image, scikit-learn, torch._dynamo or sympy. Checked in a fresh interpreter through sys.modules, with
the in-memory ledger in place of the chain (the chain client's own modules are imported as the node
imports them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from medchain.data import save_npz
from medchain.data.types import Dataset, ImageSet

FORBIDDEN = ("pandas", "matplotlib", "skimage", "sklearn", "papermill", "torch._dynamo", "sympy")

NODE_PATH = r"""
import json, sys
from medchain.cli import build_parser
args = build_parser("node").parse_args(
    ["node", "--rpc", "http://127.0.0.1:1", "--ledger", "0x" + "11" * 20, "--key-env", "K",
     "--data", sys.argv[1], "--blobs", sys.argv[2], "--institutions", "2", "--institution-index", "0"])
# what medchain.cli.node._node imports before run_node
import torch
from medchain.blobstore import store_for
from medchain.chain import LedgerClient, connect, key_from_env
from medchain.node import InstitutionNode, load_institution, val_accuracy
from medchain.protocol import CollabConfig, Institution, MemoryLedger

cfg = CollabConfig(rounds=1, batch_size=16, model="cnn")
data, n_classes, _ = load_institution(args.data, args.partition, args.institutions, args.institution_index,
                                      seed=cfg.seed)
inst = Institution(data, n_classes, cfg, MemoryLedger(b"\0" * 32, 1).as_account("a"), store_for(args.blobs))
inst.upload(0, inst.train_round(0))
inst.apply_round(0)
acc = val_accuracy(inst.model, data.val)
print(json.dumps({"acc": acc, "loaded": [m for m in %r if m in sys.modules]}))
""" % (FORBIDDEN,)


def _toy(path):
    def split(n, s):
        rng = np.random.default_rng(s)
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 100, (n, 12, 12))
        x[y == 1, 3:7, 3:7] += 60
        return ImageSet(x.astype(np.uint8), y.astype(np.int64))
    return str(save_npz(Dataset("toy", split(64, 1), split(20, 2), split(20, 3), 2, ["neg", "pos"]), path))


def test_node_first_round_imports_no_pandas_matplotlib_skimage_sklearn(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NODE_PATH, _toy(tmp_path / "toy.npz"),
                           str(tmp_path / "blobs")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [], f"a node process imported {out['loaded']}"
    assert 0.0 <= out["acc"] <= 1.0


def test_val_accuracy_equals_evaluate_acc():
    """The node's ACC (no scikit-learn) is the same number as medchain.training.evaluate's."""
    from medchain.models import build_model
    from medchain.node import val_accuracy
    from medchain.training import evaluate

    rng = np.random.default_rng(0)
    val = ImageSet(rng.integers(0, 255, (50, 12, 12)).astype(np.uint8), rng.integers(0, 3, 50).astype(np.int64))
    model = build_model("cnn", 1, 3, 0)
    assert val_accuracy(model, val) == evaluate(model, val)["acc"]
    assert np.isnan(val_accuracy(model, ImageSet(val.images[:0], val.labels[:0])))


def test_byzantine_drills_load_no_attack_stack():
    """medchain.attacks.byzantine, which every node process imports, loads neither torch nor the
    inversion and membership attacks' scikit-learn (medchain.attacks loads those on first use), and
    every name medchain.attacks exports resolves to its submodule's object."""
    import importlib

    import medchain.attacks as attacks

    code = ("import json, sys\nimport medchain.attacks.byzantine\n"
            "print(json.dumps([m for m in ('torch', 'sklearn', 'scipy', 'pandas') if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    for module in ("inversion", "membership", "byzantine"):
        mod = importlib.import_module(f"medchain.attacks.{module}")
        for name in attacks._EXPORTS[module]:
            assert getattr(attacks, name) is getattr(mod, name)
    assert set(attacks.__all__) <= set(dir(attacks))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        attacks.nope
