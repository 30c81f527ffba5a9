"""Notebook 02 in quick mode under papermill: it writes its results (every defence scored on the
same chain and seed, per-image leakage with re-identification against chance, membership
inference, the figures); one seed decides nothing."""
import json
from pathlib import Path

import pandas as pd
import pytest

from medchain.reproduce import run_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_partial_update_privacy.ipynb"
QUICK_DEFENCES = {"none", "bn_local", "partial_largest", "none_tanh", "dp_eps3"}


def _check_outputs(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    for key in ("verdicts", "per_defence", "leakage", "attack_budget", "chain", "versions", "git_commit",
                "provenance", "data"):
        assert key in s, key
    v, dp = s["verdicts"]                  # partial update, then DP-SGD against its own model's reference
    assert v["verdict"] == "inconclusive" and v["holds"] is None and "1 seed" in v["detail"]
    assert "dp_eps3" in dp["claim"] and "none_tanh" in dp["claim"] and dp["verdict"] == "inconclusive"
    d = s["per_defence"]["dp_eps3"]
    assert d["reference"] == "none_tanh" and d["settings"]["model"] == "cnn_tanh"
    assert d["settings"]["optimizer"] == "sgd" and d["settings"]["dp_epsilon"] == 3
    assert d["dp"]["epsilon_spent_max"] == pytest.approx(3.0, abs=0.02) and d["dp"]["epsilon_spent_max"] <= 3
    assert {"loss", "update_loss", "update_lira"} <= set(d["mia"])
    assert {d["metric"] for d in v["decisions"]} == {"acc", "balanced_acc", "auc", "attack_check", "reid"}
    assert set(s["per_defence"]) == QUICK_DEFENCES
    assert s["per_defence"]["bn_local"]["bn_values_per_update"] == 0
    assert s["per_defence"]["none"]["bn_values_per_update"] > 0
    leak = {(r["setting"], r["defence"]): r for r in s["leakage"]}
    assert {d for st, d in leak if st == "protocol"} == QUICK_DEFENCES
    # the upper bound: a full one-step LeNet gradient gives the image back, far beyond the mean image
    bound = leak[("worst_case", "lenet_theta_1")]
    assert bound["psnr_worst"] >= bound["mean_image_psnr_worst"] + 10 and bound["rank_best"] == 1
    for r in s["leakage"]:
        assert r["chance_rank1"] == pytest.approx(1 / r["pool_size"]) and 0 <= r["reid_percentile_mean"] <= 1
    (c,) = s["chain"]
    assert set(c["ledger_address"]) == QUICK_DEFENCES
    assert all(a.startswith("0x") for a in c["ledger_address"].values())
    m = pd.read_csv(out / "metrics.csv")
    assert set(m.measure) == {"utility", "inversion", "membership"}
    assert set(m[m.measure == "inversion"].setting) == {"worst_case", "protocol"}
    for stem in ("privacy_utility_frontier", "leakage_per_image", "membership", "reconstructions_protocol"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    return s


@pytest.mark.slow
def test_notebook_02_quick_run(tmp_path):
    run_notebook(NOTEBOOK, tmp_path, quick=True, progress=False)
    s = _check_outputs(tmp_path / "02_partial_update_privacy")
    assert s["seeds"] == [0] and s["parameters"]["quick"] is True


@pytest.mark.slow
def test_notebook_02_quick_run_on_colour_retinamnist(tmp_path):
    """RGB images with 5 classes (RetinaMNIST) go through training, the attacks and the RGB
    reconstruction figures."""
    from conftest import SHARED_MEDMNIST
    path = SHARED_MEDMNIST / "retinamnist.npz"
    if not path.exists():
        pytest.skip(f"real RetinaMNIST not found at {path} (only on the project's machines)")
    run_notebook(NOTEBOOK, tmp_path, quick=True, parameters={"source": str(path)}, progress=False)
    s = _check_outputs(tmp_path / "02_partial_update_privacy")
    assert s["data"]["n_channels"] == 3 and s["data"]["n_classes"] == 5
