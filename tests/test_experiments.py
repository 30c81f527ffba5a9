"""The claim-1 experiment is deterministic by seed, selects every method on validation data, and
decides over seeds with medchain.stats (never on one seed)."""
import numpy as np
import pytest

from medchain.data import load_dataset
from medchain.experiments.collaborative import (compare_on_partition, partition_summary, run_seed,
                                                 summarize)
from medchain.experiments.seeds import map_seeds, parse_seeds
from medchain.protocol import CollabConfig


@pytest.mark.slow
def test_compare_on_partition_is_deterministic_and_summarised():
    ds = load_dataset("simulated:n=400,sites=2,seed=3")
    cfg = CollabConfig(rounds=2, local_epochs=1, model="lenet", seed=3)
    runs = [compare_on_partition(ds, "sites", cfg, chain="embedded") for _ in range(2)]
    assert runs[0].rows == runs[1].rows
    assert runs[0].curves.equals(runs[1].curves)
    assert runs[0].collab.final_digest == runs[1].collab.final_digest
    s = partition_summary(runs[0], tolerance=0.02)
    assert s["rounds"] == 2 and s["seed"] == 3
    # counted in rounds, not in passes over the local data
    by_round = [h["acc"] for h in runs[0].collab.history]
    first = next((i + 1 for i, a in enumerate(by_round) if a >= s["centralized"]["acc"] - 0.02), None)
    assert s["rounds_to_within_tolerance"] == first
    for m in ("acc", "balanced_acc", "auc"):
        assert s["gap_collaborative_minus_centralized"][m] == pytest.approx(
            s["collaborative"][m] - s["centralized"][m], abs=1e-12)
    # equal budgets and one selection rule, recorded
    assert s["passes_over_local_data"] == {"centralized": 2, "local_only": 2, "collaborative": 2}
    sel = s["selection"]
    assert 1 <= sel["collaborative_round"] <= 2
    assert sel["collaborative_round_digest"] == runs[0].collab.history[sel["collaborative_round"] - 1]["digest"]
    lo, hi = s["gap_test_image_interval_95"]
    assert lo <= s["gap_collaborative_minus_centralized"]["acc"] <= hi
    assert 0 <= s["chain_overhead_pct"] <= 100
    assert set(runs[0].curves.method) == {"centralized", "local_only", "collaborative"}
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
