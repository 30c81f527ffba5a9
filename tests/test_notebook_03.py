"""Notebook 03 in quick mode under papermill: the default pair (simulated CT: nodule detection on
chain A → grading at unseen sites on chain B) with its unrelated-source control; it writes its
results, records chain A's source ledgers, every chain B and one bridge message per source, the
controls at every fraction, and decides claim 3 at 5% target data only over seeds (one seed:
inconclusive)."""
import json
from pathlib import Path

import pandas as pd
import pytest

from medchain.reproduce import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_cross_chain_transfer.ipynb"
ARMS = {"none", "warm_start@similar", "probe@similar", "pooled@similar", "warm_start@unrelated",
        "probe@unrelated"}
CHAIN_ARMS = {"none", "warm_start@similar", "warm_start@unrelated"}


@pytest.mark.slow
def test_notebook_03_quick_run_records_transfer_and_decides_nothing_on_one_seed(tmp_path):
    run_notebook(NOTEBOOK, tmp_path, quick=True, progress=False)
    out = tmp_path / "03_cross_chain_transfer"
    s = json.loads((out / "summary.json").read_text())
    assert {"claim", "pair", "arms", "verdicts", "speedup_rounds_to_target", "final_acc_gain", "per_fraction", "chain",
            "target_runs", "source_tasks", "parameters", "seeds", "versions", "git_commit", "provenance",
            "data"} <= set(s)
    assert s["pair"]["name"] == "ct_detection" and set(s["pair"]["relations"]) == {"similar", "unrelated"}
    assert s["pair"]["shared_images"] == {"similar": 0, "unrelated": 0}
    assert set(s["data"]) == {"target", "similar", "unrelated"} and len(s["data"]["target"]["content_sha256"]) == 64
    assert s["claim"] == 3 and s["parameters"]["quick"] is True and set(s["arms"]) == ARMS
    fractions = [f"{f:g}" for f in s["parameters"]["fractions"]]
    assert "0.05" in fractions and set(s["per_fraction"]) == set(fractions)
    n_seeds = len(s["parameters"]["seeds"])

    # the numbers: per fraction and arm, gains relative to no transfer, intervals of ACC / bal. ACC / AUC
    for f in fractions:
        e = s["per_fraction"][f]
        assert set(e) >= ARMS
        for a in ARMS:
            assert 0 < e[a]["final_acc_mean"] <= 1 and len(e[a]["per_seed_final_acc"]) == n_seeds
            assert e[a]["gain_mean"] == pytest.approx(e[a]["final_acc_mean"] - e["none"]["final_acc_mean"])
            assert e[a]["acc"]["mean"] == pytest.approx(e[a]["final_acc_mean"]) and e[a]["balanced_acc"]["n"] == n_seeds
        assert e["none"]["speedup"] == 1 and e["none"]["gain_mean"] == 0
        assert set(s["speedup_rounds_to_target"][f]) == CHAIN_ARMS - {"none"}     # controls have no rounds
        assert set(s["final_acc_gain"][f]) == ARMS - {"none"}

    # the verdict at 5%: per chain method from the similar source, against no transfer and the unrelated source
    v5 = [v for v in s["verdicts"] if "5% target data" in v["claim"]]
    assert len(v5) == 1 and s["seeds"] == [0]
    (v,) = v5
    assert v["verdict"] == "inconclusive" and v["holds"] is None and "unrelated source" in v["claim"]
    acc = [d for d in v["decisions"] if d["metric"] == "acc"]
    assert [d["b"] for d in acc] == ["no transfer", "warm start (unrelated)"]
    e = s["per_fraction"]["0.05"]
    assert acc[0]["values"] == pytest.approx([e["warm_start@similar"]["gain_mean"]])
    assert acc[1]["values"] == pytest.approx([e["warm_start@similar"]["final_acc_mean"]
                                              - e["warm_start@unrelated"]["final_acc_mean"]])

    # chain A holds one ledger per source; every chain B one bridge message per source
    a, chain_b, message_ids = s["chain"]["A"], s["chain"]["B"], s["chain"]["bridge_message_ids"]
    ledgers = a["ledgers"]
    assert set(ledgers) == {"similar", "unrelated"} and len(set(ledgers.values())) == 2
    assert a["final_block_hash"].startswith("0x")
    assert len(chain_b) == n_seeds and len(message_ids) == 2 * n_seeds == len(set(message_ids))
    for b in chain_b:
        assert set(b["messages"]) == {"similar", "unrelated"}
        for rel, m in b["messages"].items():
            assert m["message_id"] in message_ids and len(m["signers"]) >= s["parameters"]["quorum"]
            assert m["source_ledger"] == ledgers[rel]
        assert b["bridge"] not in ledgers.values() and b["genesis_hash"] != a["genesis_hash"]
        assert b["final_block_hash"].startswith("0x")
    targets = s["chain"]["target_ledgers"]
    assert len(targets) == len(fractions) * len(CHAIN_ARMS) * n_seeds == len(set(targets))
    assert len(s["target_runs"]) == len(fractions) * len(ARMS) * n_seeds
    assert not set(ledgers.values()) & set(targets)

    metrics = pd.read_csv(out / "metrics.csv")
    assert {"kind", "fraction", "method", "seed", "metric", "value"} <= set(metrics.columns)
    assert set(metrics.method) == ARMS and set(metrics.kind) == {"curve", "per_seed"}
    curve_acc = metrics[(metrics.kind == "curve") & (metrics.metric == "acc")]
    rounds = s["parameters"]["target_collab"]["rounds"]
    assert len(curve_acc) == len(fractions) * n_seeds * (len(CHAIN_ARMS) * rounds + len(ARMS - CHAIN_ARMS))
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == len(fractions) * len(ARMS) and {"acc", "balanced_acc", "auc"} <= set(scores.columns)
    for stem in ("accuracy_vs_round", "transfer_vs_fraction"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000
