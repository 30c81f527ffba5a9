"""Notebook 03 in quick mode under papermill: it writes its results, records both chains and the
bridge message, and decides claim 3 at 5% target data only over seeds (one seed: inconclusive)."""
import json
from pathlib import Path

import pandas as pd
import pytest

from medchain.reproduce import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_cross_chain_transfer.ipynb"
METHODS = {"none", "warm_start", "l2sp"}


@pytest.mark.slow
def test_notebook_03_quick_run_records_transfer_and_decides_nothing_on_one_seed(tmp_path):
    run_notebook(NOTEBOOK, tmp_path, quick=True, progress=False)
    out = tmp_path / "03_cross_chain_transfer"
    s = json.loads((out / "summary.json").read_text())
    assert {"claim", "verdicts", "speedup_rounds_to_target", "final_acc_gain", "per_fraction", "chain", "target_runs",
            "parameters", "seeds", "versions", "git_commit", "provenance", "data"} <= set(s)
    assert set(s["data"]) == {"source", "target"} and len(s["data"]["target"]["sha256"]) == 64
    assert s["claim"] == 3 and s["parameters"]["quick"] is True
    fractions = [f"{f:g}" for f in s["parameters"]["fractions"]]
    assert "0.05" in fractions and set(s["per_fraction"]) == set(fractions)
    n_seeds = len(s["parameters"]["seeds"])

    # the numbers: per fraction and method, gains relative to no transfer, rounds to its final ACC
    for f in fractions:
        e = s["per_fraction"][f]
        assert set(e) >= METHODS
        for m in METHODS:
            assert 0 < e[m]["final_acc_mean"] <= 1 and len(e[m]["per_seed_final_acc"]) == n_seeds
            assert e[m]["gain_mean"] == pytest.approx(e[m]["final_acc_mean"] - e["none"]["final_acc_mean"])
        assert e["none"]["speedup"] == 1 and e["none"]["gain_mean"] == 0
        assert set(s["speedup_rounds_to_target"][f]) == set(s["final_acc_gain"][f]) == {"warm_start", "l2sp"}
        for m in ("warm_start", "l2sp"):
            assert s["final_acc_gain"][f][m] == pytest.approx(e[m]["gain_mean"])
            assert s["speedup_rounds_to_target"][f][m] == pytest.approx(e[m]["speedup"])

    # the verdict at 5%: one per transfer method, a paired decision over seeds; quick = one seed
    v5 = [v for v in s["verdicts"] if "5% target data" in v["claim"]]
    assert len(v5) == 2 and s["seeds"] == [0]
    e = s["per_fraction"]["0.05"]
    for v, m in zip(v5, ("warm_start", "l2sp")):
        assert v["verdict"] == "inconclusive" and v["holds"] is None
        acc = [d for d in v["decisions"] if d["metric"] == "acc"][0]
        assert acc["values"] == pytest.approx([e[m]["gain_mean"]])

    # both chains and the bridge message are recorded
    a, chain_b, message_ids = s["chain"]["A"], s["chain"]["B"], s["chain"]["bridge_message_ids"]
    assert a["ledger_address"].startswith("0x") and len(a["final_global_digest"]) == 64
    assert a["chain_identity"].endswith(a["ledger_address"]) and a["final_block_hash"].startswith("0x")
    assert len(chain_b) == n_seeds == len(message_ids)
    for b, mid in zip(chain_b, message_ids):
        assert b["message_id"] == mid and len(mid) == 66
        assert len(b["signers"]) >= s["parameters"]["quorum"]
        assert b["bridge"] != a["ledger_address"] and b["genesis_hash"] != a["genesis_hash"]
        assert b["final_block_hash"].startswith("0x")
    targets = s["chain"]["target_ledgers"]
    assert len(targets) == len(s["target_runs"]) == len(fractions) * 3 * n_seeds
    assert len(set(targets)) == len(s["target_runs"]) and a["ledger_address"] not in targets

    metrics = pd.read_csv(out / "metrics.csv")
    assert {"kind", "fraction", "method", "seed", "metric", "value"} <= set(metrics.columns)
    assert set(metrics.method) == METHODS and set(metrics.kind) == {"curve", "per_seed"}
    curve_acc = metrics[(metrics.kind == "curve") & (metrics.metric == "acc")]
    assert len(curve_acc) == len(fractions) * 3 * n_seeds * s["parameters"]["target_collab"]["rounds"]
    for stem in ("accuracy_vs_round", "transfer_vs_fraction"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000
