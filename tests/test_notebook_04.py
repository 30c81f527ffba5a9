"""Notebook 04 (claim 4) runs end to end in quick mode and records what decides the claim."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medchain.reproduce import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_personalization.ipynb"
METHODS = {"finetune_all", "finetune_head", "fedper", "fedbn"}
REFERENCES = {"majority", "local_only", "global", "global_prior"}


@pytest.mark.slow
def test_notebook_04_quick(tmp_path):
    run_notebook(NOTEBOOK, tmp_path, quick=True, progress=False)
    out = tmp_path / "04_personalization"
    s = json.loads((out / "summary.json").read_text())
    assert s["claim"] == 4
    for key in ("verdicts", "settings", "parameters", "seed", "versions", "git_commit",
                "ledger_address", "final_block_hash", "local_coordinates_never_shared", "runtime_s"):
        assert key in s, key
    assert s["parameters"]["quick"] is True
    assert s["local_coordinates_never_shared"] is True
    settings = s["parameters"]["settings"]
    assert set(s["settings"]) == set(settings) and len(s["verdicts"]) == len(settings)
    for name, p in s["settings"].items():
        assert set(p["methods"]) == METHODS | REFERENCES
        for m, v in p["methods"].items():
            for k in ("mean_acc", "worst_acc", "mean_balanced_acc", "worst_balanced_acc"):
                assert 0.0 <= v[k] <= 1.0, (name, m, k)
            assert v["worst_acc"] <= v["mean_acc"] + 1e-12
            if m != "global":
                assert "gain_over_global" in v
            if m != "global_prior":
                g = v["gain_over_global_prior"]["mean_balanced_acc"]
                assert g == pytest.approx(v["mean_balanced_acc"] - p["methods"]["global_prior"]["mean_balanced_acc"])
        assert p["best_method"] in METHODS
        assert isinstance(p["holds"], bool) and isinstance(p["holds_strict"], bool)
        assert p["holds"] or not p["holds_strict"]
        for run in ("fedavg", "fedper", "fedbn"):
            assert p["ledger_address"][run].startswith("0x")
            assert p["final_block_hash"][run].startswith("0x")
        for m in ("fedper", "fedbn"):
            a = p["audits"][m]
            assert a["ok"] and a["shared_local"] == 0 and a["union_is_complement"] and a["payloads"] > 0
    for v in s["verdicts"]:
        assert set(v) == {"claim", "holds", "detail"}
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"setting", "method", "institution", "split", "metric", "value"} <= set(metrics.columns)
    assert set(metrics.method) == METHODS | REFERENCES
    assert {"acc", "balanced_acc", "auc"} <= set(metrics.metric)
    for ext in ("png", "pdf"):
        assert (out / f"personalization_gains.{ext}").stat().st_size > 0
