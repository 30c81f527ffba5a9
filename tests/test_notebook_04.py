"""Notebook 04 (claim 4) runs end to end in quick mode, records what decides the claim, audits that
local-only coordinates never went on chain, and decides nothing on one seed."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medchain.reproduce import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_personalization.ipynb"
METHODS = {"finetune_all", "finetune_head", "fedper", "fedbn"}
REFERENCES = {"majority", "local_only", "global", "global_prior", "global_uniform"}


@pytest.mark.slow
def test_notebook_04_quick(tmp_path):
    run_notebook(NOTEBOOK, tmp_path, quick=True, progress=False)
    out = tmp_path / "04_personalization"
    s = json.loads((out / "summary.json").read_text())
    assert s["claim"] == 4 and s["seeds"] == [0]
    for key in ("verdicts", "settings", "per_seed", "chain", "parameters", "versions", "git_commit",
                "local_coordinates_never_shared", "runtime_s", "provenance", "data"):
        assert key in s, key
    assert s["parameters"]["quick"] is True
    assert s["local_coordinates_never_shared"] is True
    settings = s["parameters"]["settings"]
    assert set(s["settings"]) == set(settings) and len(s["verdicts"]) == len(settings)
    for v in s["verdicts"]:
        assert v["verdict"] == "inconclusive" and v["holds"] is None and v["deciding_metric"] == "balanced_acc"
        assert {d["metric"] for d in v["decisions"]} >= {"balanced_acc", "acc"}
    (seed0,) = s["per_seed"]
    for name, p in seed0["settings"].items():
        assert set(p["methods"]) == METHODS | REFERENCES
        for m, v in p["methods"].items():
            for k in ("mean_acc", "worst_acc"):
                assert 0.0 <= v[k] <= 1.0, (name, m, k)
            assert v["worst_acc"] <= v["mean_acc"] + 1e-12
        assert p["by_metric"]["balanced_acc"]["reference"] == "global_uniform"
        assert p["by_metric"]["acc"]["reference"] == "global_prior"
        assert p["best_method"] in METHODS
        for run in ("fedavg", "fedper", "fedbn"):
            assert p["ledger_address"][run].startswith("0x")
            assert p["final_block_hash"][run].startswith("0x")
        for m in ("fedper", "fedbn"):
            a = p["audits"][m]
            assert a["ok"] and a["shared_local"] == 0 and a["union_is_complement"] and a["payloads"] > 0
        # the decision's single value is this seed's mean paired difference of the chosen method
        d = [x for x in s["settings"][name]["verdict"]["decisions"]
             if x["metric"] == "balanced_acc" and x["kind"] == "superiority"][0]
        assert d["values"][0] == pytest.approx(p["by_metric"]["balanced_acc"]["gain_over_reference"], abs=1e-9)
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"setting", "method", "institution", "split", "metric", "value", "seed"} <= set(metrics.columns)
    assert set(metrics.method) == METHODS | REFERENCES
    assert {"acc", "balanced_acc", "auc"} <= set(metrics.metric)
    for ext in ("png", "pdf"):
        assert (out / f"personalization_gains.{ext}").stat().st_size > 0
        assert (out / f"personalization_sweep.{ext}").stat().st_size > 0
    # each institution's own test set from the pooled data, sizes recorded; the sweep says where it pays
    target = s["parameters"]["test_per_institution"]
    for name, p in seed0["settings"].items():
        assert p["n_test"] == [sum(c) for c in p["test_label_counts"]]
        assert all(n <= target for n in p["n_test"])
        assert p["test_below_target"] == [i for i, n in enumerate(p["n_test"]) if n < target]
        assert s["settings"][name]["test_sizes"]["min"] == min(p["n_test"])
    assert set(s["sweep"]["where"]) == {"balanced_acc", "acc"}
    assert s["sweep"]["where"]["balanced_acc"]["beats_both"] == []      # one seed decides nothing
    assert len(s["sweep"]["table"]) == len(settings) * 2 * 3
