"""`medchain train --out FILE.csv`: a tidy CSV (one row per measurement) and a JSON record beside it
(parameters, seed, data provenance, versions); an --out that cannot be written fails before any
data is loaded or model trained, with exit status 1 and a message naming the problem."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

import medchain.data
from medchain import cli

TINY = ["--data", "simulated:n=240,sites=3,seed=0", "--institutions", "3", "--epochs", "1",
        "--batch-size", "32", "--seed", "3", "--quiet"]


def test_out_writes_tidy_csv_and_json_record(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *TINY, "--out", "runs/base.csv"]) == 0   # relative to the caller's folder
    csv_path, json_path = tmp_path / "runs" / "base.csv", tmp_path / "runs" / "base.json"
    assert f"wrote {os.path.join('runs', 'base.csv')}" in capsys.readouterr().out

    table = pd.read_csv(csv_path)
    assert list(table.columns) == ["method", "model_of", "eval_on", "metric", "value"]
    assert set(table.method) == {"centralized", "local_only", "majority"}
    assert set(table.metric) == {"acc", "balanced_acc", "auc", "loss"}
    assert set(table.eval_on) == {"pooled", "inst0", "inst1", "inst2"}
    assert not table.duplicated(["method", "model_of", "eval_on", "metric"]).any()
    acc = table[table.metric == "acc"].value
    assert acc.between(0, 1).all()
    # centralized: pooled + 3 institutions, 4 metrics; local-only: 3 models × (pooled + own) × 4;
    # majority: one ACC per institution
    assert len(table) == 4 * 4 + 3 * 2 * 4 + 3

    record = json.loads(json_path.read_text())
    assert record["seed"] == 3 and record["seeds"] == [3]
    assert record["parameters"]["epochs"] == 1 and record["parameters"]["out"] == os.path.join("runs", "base.csv")
    assert record["config"]["seed"] == 3 and record["institutions"] == 3
    for pkg in ("torch", "numpy", "scipy", "pillow", "medchain", "python", "cpu_capability"):
        assert record["versions"][pkg]
    data = record["data"]
    assert data["source"].startswith("simulated:n=240,sites=3,seed=0") and data["kind"] == "simulated"
    assert len(data["sha256"]) == 64 and data["n_total"] == 240 and data["n_classes"] == 3
    assert record["git_commit"]
    pooled_central = table[(table.method == "centralized") & (table.eval_on == "pooled") & (table.metric == "acc")]
    assert record["centralized_acc"] == pytest.approx(pooled_central.value.item())
    assert record["metrics_csv"] == "base.csv"


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the command gets as far as loading data."""
    def refuse(*a, **k):
        raise AssertionError("data was loaded before --out was checked")
    monkeypatch.setattr(medchain.data, "load_dataset", refuse)


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "run.csv"


def _a_folder(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    return tmp_path / "dir.csv"


@pytest.mark.parametrize("make_out, words", [
    (_under_a_file, "cannot create the folder"),
    (_a_folder, "is a folder"),
    (lambda p: p / "run.txt", "ending in .csv"),
])
def test_bad_out_fails_before_training(tmp_path, capsys, no_training, make_out, words):
    out = make_out(tmp_path)
    assert cli.main(["train", *TINY, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medchain: error: --out") and words in err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder_fails_before_training(tmp_path, capsys, no_training):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert cli.main(["train", *TINY, "--out", str(folder / "run.csv")]) == 1
    finally:
        folder.chmod(0o700)
    assert "cannot write to the folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_unwritable_out_exits_1_in_a_fresh_process(tmp_path):
    (tmp_path / "file").write_text("x")
    code = "import sys; from medchain.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "train", *TINY, "--out", str(tmp_path / "file" / "r.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == "" and "cannot create the folder" in proc.stderr
