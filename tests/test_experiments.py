"""The claim-1 experiment is deterministic by seed, selects every method on validation data, and
decides over seeds with medchain.stats (never on one seed)."""
import numpy as np
import pytest

from medchain.data import load_dataset
from medchain.experiments.collaborative import (compare_on_partition, method_table, partition_summary,
                                                 run_seed, summarize)
from medchain.experiments.seeds import map_seeds, parse_seeds
from medchain.protocol import CollabConfig


@pytest.mark.slow
def test_compare_on_partition_is_deterministic_and_summarised(tmp_path, monkeypatch):
    """...and the second run's baselines come from the run cache, equal to the first's."""
    monkeypatch.setenv("MEDCHAIN_RUN_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("simulated:n=400,sites=2,seed=3")
    cfg = CollabConfig(rounds=2, local_epochs=1, model="lenet", seed=3)
    runs = [compare_on_partition(ds, "sites", cfg, chain="embedded") for _ in range(2)]
    assert runs[0].extra["baselines_from_run_cache"] == {"centralized": False, "local_only": False}
    assert runs[1].extra["baselines_from_run_cache"] == {"centralized": True, "local_only": True}
    assert runs[0].rows == runs[1].rows
    assert runs[0].curves.equals(runs[1].curves)
    assert runs[0].collab.final_digest == runs[1].collab.final_digest
    s = partition_summary(runs[0], tolerance=0.02)
    assert s["rounds"] == 2 and s["seed"] == 3
    assert s["baselines_from_run_cache"] == {"centralized": False, "local_only": False}
    # counted in rounds, not in passes over the local data
    by_round = [h["acc"] for h in runs[0].extra["curve"]]
    first = next((i + 1 for i, a in enumerate(by_round) if a >= s["centralized"]["acc"] - 0.02), None)
    assert s["rounds_to_within_tolerance"] == first
    for m in ("acc", "balanced_acc", "auc"):
        assert s["gap_collaborative_minus_centralized"][m] == pytest.approx(
            s["collaborative"][m] - s["centralized"][m], abs=1e-12)
    # equal budgets and one selection rule, recorded
    assert s["passes_over_local_data"] == {"centralized": 2, "local_only": 2, "collaborative": 2,
                                           "collaborative[fedavg]": 2}
    assert s["selection"]["collaborative_method"] == "fedavg" and set(s["method_details"]) == {"fedavg"}
    sel = s["selection"]
    assert 1 <= sel["collaborative_round"] <= 2
    assert sel["collaborative_round_digest"] == runs[0].collab.history[sel["collaborative_round"] - 1]["digest"]
    lo, hi = s["gap_test_image_interval_95"]
    assert lo <= s["gap_collaborative_minus_centralized"]["acc"] <= hi
    assert 0 <= s["chain_overhead_pct"] <= 100
    assert set(runs[0].curves.method) == {"centralized", "local_only", "collaborative", "collaborative[fedavg]"}
    assert np.all(runs[0].curves.acc.between(0, 1))


def _fake_seed(seed, cen, col, loc):
    metrics = lambda a: {"acc": a, "balanced_acc": a - 0.01, "auc": min(a + 0.05, 1.0)}
    c, k, lo = metrics(cen), metrics(col), metrics(loc)
    return {"summary": {"seed": seed, "centralized": c, "collaborative": k, "local_only_mean": lo,
                        "collaborative_last_round": k,
                        "gap_collaborative_minus_centralized": {m: k[m] - c[m] for m in k},
                        "gain_over_local_only": {m: k[m] - lo[m] for m in k}}}


def test_summarize_decides_over_seeds_and_one_seed_is_inconclusive():
    close = [_fake_seed(s, 0.90, 0.895 + 0.001 * s, 0.75) for s in range(5)]
    out = summarize(close, 0.02, partition_name="iid")
    assert out["seeds"] == [0, 1, 2, 3, 4]
    assert out["verdict"]["verdict"] == "holds" and out["verdict"]["deciding_metric"] == "acc"
    assert out["methods"]["collaborative"]["acc"]["n"] == 5
    assert len(out["verdict"]["decisions"]) == 6      # 2 comparisons × 3 metrics
    far = [_fake_seed(s, 0.90, 0.80 + 0.002 * s, 0.75) for s in range(5)]
    assert summarize(far, 0.02, partition_name="sites")["verdict"]["verdict"] == "fails"
    one = summarize(close[:1], 0.02, partition_name="iid")["verdict"]
    assert one["verdict"] == "inconclusive" and one["holds"] is None and "1 seed" in one["detail"]


def _fake_methods_seed(seed, cen, gaps: dict[str, tuple[float, float]], chosen: str):
    """A per-seed summary with method_details: gaps[m] = (pooled ACC gap, worst-site ACC gap)."""
    out = _fake_seed(seed, cen, cen + gaps[chosen][0], cen - 0.1)["summary"]
    metrics = lambda a: {"acc": a, "balanced_acc": a, "auc": a}
    out["method_details"] = {m: {"pooled": metrics(cen + g), "gap": metrics(g), "worst_site": metrics(cen + w),
                                 "gap_worst_site": metrics(w), "worst_gap_site": "inst1",
                                 "val": {"acc": cen + g}, "chain": {"upload_bytes_per_round": 1e6 * (1 + (m == "b")),
                                                                    "update_gas_per_round": 9e4, "values_per_update": 10},
                                 "lr": 0.002 * (1 + seed % 2),
                                 "worst_gap_site_diagnostics": {k: {"method": 0.5 + seed, "centralized": 0.1}
                                                                for k in ("loss", "ece", "bn_distance")}}
                             for m, (g, w) in gaps.items()}
    out["selection"] = {"collaborative_method": chosen}
    out["gap_worst_site_collaborative_minus_centralized"] = metrics(gaps[chosen][1])
    return {"summary": out}


def test_summarize_describes_every_method_and_decides_the_target_on_the_chosen_one():
    gaps = lambda s: {"a": (-0.10 + 0.002 * s, -0.30), "b": (-0.01 + 0.002 * s, -0.03 - 0.002 * s)}
    runs = [_fake_methods_seed(s, 0.9, gaps(s), "b") for s in range(5)]
    out = summarize(runs, 0.02, partition_name="sites", target=(0.03, 0.05))
    assert out["chosen_methods"] == ["b"] * 5
    b = out["methods"]["collaborative[b]"]
    assert b["chosen_in_seeds"] == [0, 1, 2, 3, 4] and out["methods"]["collaborative[a]"]["chosen_in_seeds"] == []
    assert b["gap"]["acc"]["mean"] == pytest.approx(-0.006) and b["chain"]["upload_bytes_per_round"] == 2e6
    t = out["target"]
    assert t["verdict"] == "holds" and t["deciding_metric"] == ("acc", "worst_site_acc")
    assert t["closest_method"] == "b"
    table = method_table(out)
    assert list(table.index) == ["collaborative[a]", "collaborative[b]"]
    assert table.loc["collaborative[b]", "upload MB / round"] == pytest.approx(2.0)
    assert table.loc["collaborative[b]", "lr"] == [0.002, 0.004]
    diag = b["worst_gap_site_diagnostics"]
    assert diag["ece"]["method"]["mean"] == pytest.approx(2.5) and diag["loss"]["centralized"]["mean"] == pytest.approx(0.1)
    far = [_fake_methods_seed(s, 0.9, {"a": (-0.10 + 0.002 * s, -0.30), "b": (-0.06 + 0.002 * s, -0.2)}, "b")
           for s in range(5)]
    t = summarize(far, 0.02, partition_name="sites", target=(0.03, 0.05))["target"]
    assert t["verdict"] == "fails" and t["closest_method"] == "b"
    assert t["shortfall_relative_to_margin"]["a"] > t["shortfall_relative_to_margin"]["b"] > 1
    assert "target" not in summarize(far, 0.02, partition_name="iid")


def test_parse_seeds_forms_and_errors():
    assert parse_seeds([0, 1, 2]) == [0, 1, 2]
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds(None, seed=7) == [7]
    assert parse_seeds(3) == [3]
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds([1, 1])
    with pytest.raises(ValueError, match="range"):
        parse_seeds("a-b")


@pytest.mark.slow
def test_seeds_in_parallel_processes_equal_serial_runs(one_thread):
    ds = load_dataset("simulated:n=300,sites=2,seed=1")
    cfg = CollabConfig(rounds=1, local_epochs=1, model="lenet")
    kw = dict(dataset=ds, scheme="iid", cfg=cfg, tolerance=0.02, institutions=2, chain=None,
              centralized_epochs=1)
    serial = map_seeds(run_seed, [0, 1], jobs=1, progress=False, **kw)
    parallel = map_seeds(run_seed, [0, 1], jobs=2, progress=False, **kw)
    for a, b in zip(serial, parallel):
        assert a["summary"]["final_global_digest"] == b["summary"]["final_global_digest"]
        assert a["rows"] == b["rows"]
    assert serial[0]["summary"]["final_global_digest"] != serial[1]["summary"]["final_global_digest"]


@pytest.mark.slow
def test_learning_rate_factors_reach_every_method_and_sites_carry_calibration(one_thread):
    ds = load_dataset("simulated:n=300,sites=2,seed=4")
    cfg = CollabConfig(rounds=1, local_epochs=1, model="lenet", lr=0.002, seed=1)
    run = compare_on_partition(ds, "sites", cfg, chain=None, methods=["fedavg", "scaffold"],
                               lr_scales={"centralized": 2.0, "scaffold": 0.5})
    s = partition_summary(run, tolerance=0.02)
    assert s["selection"]["lr"] == pytest.approx({"centralized": 0.004, "fedavg": 0.002, "scaffold": 0.025})
    assert s["method_details"]["scaffold"]["lr"] == pytest.approx(0.025)
    for m in ("fedavg", "scaffold"):
        for site in s["method_details"][m]["per_site"].values():
            assert 0.0 <= site["ece"] <= 1.0
        diag = s["method_details"][m]["worst_gap_site_diagnostics"]
        assert set(diag) == {"loss", "ece", "bn_distance"} and diag["loss"]["centralized"] > 0
