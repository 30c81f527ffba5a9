"""`medchain verify`: a rerun judged against its recording (identical on the same machine type and
code, else inside the recorded prediction intervals, no more outside than chance)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from medchain import stats
from medchain.reproduce import list_notebooks
from medchain.verify import (compare, judge, mean_check, notebook_for, recorded_parameters, run_seeds,
                             same_machine, verify)

VERSIONS = {"cpu_capability": "AVX512", "machine": "x86_64", "torch": "2.13.0+cpu", "numpy": "2.4.6",
            "torch_threads": "1"}


def summary(values_by_decision: dict[str, list[float]], seeds=(0, 1, 2, 3, 4), commit="abc",
            versions=VERSIONS) -> dict:
    """A summary.json as the notebooks write it, with one superiority decision per entry."""
    decisions = [stats.superiority(v, 0.0, metric=metric, a="collaborative", b="local-only").to_dict()
                 for metric, v in values_by_decision.items()]
    return {"seeds": list(seeds), "versions": dict(versions), "provenance": {"git_commit": commit, "dirty": False},
            "parameters": {"source": "breastmnist", "rounds": 20, "quick": False, "jobs": 2, "seeds": None,
                           "collab": {"rounds": 20}},
            "verdicts": [{"claim": "claim 1 (iid)", "decisions": decisions}]}


RECORDED = summary({"acc": [0.10, 0.12, 0.08, 0.11, 0.09], "auc": [0.02, 0.03, 0.01, 0.04, 0.02]})


def test_prediction_interval_is_wider_than_the_interval_of_the_mean():
    values = [0.10, 0.12, 0.08, 0.11, 0.09]
    lo, hi = stats.prediction_interval(values)
    mlo, mhi = stats.t_interval(values)
    assert lo < mlo < mhi < hi
    # mean ± t(4) sd sqrt(1 + 1/5): sd = 0.0158, t = 2.776
    assert hi - lo == pytest.approx(2 * 2.7764 * np.std(values, ddof=1) * np.sqrt(1.2), rel=1e-3)
    assert np.isnan(stats.prediction_interval([0.1])[0])


def test_same_machine_and_code_demands_identical_numbers():
    rerun = summary({"acc": [0.10], "auc": [0.02]}, seeds=[0])
    assert same_machine(RECORDED, rerun)
    dirty = copy.deepcopy(rerun)
    dirty["provenance"]["dirty"] = True            # same commit, uncommitted changes: other code
    assert not same_machine(RECORDED, dirty)
    v = judge(compare(RECORDED, rerun), mean_check(RECORDED, rerun), exact=True, rerun_dir=None)
    assert v.ok and v.rows["identical"].all() and len(v.rows) == 2
    off = summary({"acc": [0.1000001], "auc": [0.02]}, seeds=[0])
    v = judge(compare(RECORDED, off), mean_check(RECORDED, off), exact=True, rerun_dir=None)
    assert not v.ok and "NOT VERIFIED" in v.text()


def test_another_cpu_is_judged_by_the_prediction_intervals():
    other = dict(VERSIONS, cpu_capability="AVX2")
    near = summary({"acc": [0.115, 0.095], "auc": [0.035, 0.01]}, seeds=[0, 3], versions=other)
    assert not same_machine(RECORDED, near)
    rows = compare(RECORDED, near)
    assert list(rows["seed"]) == [0, 3, 0, 3]
    assert rows.loc[0, "recorded"] == pytest.approx(0.10) and rows.loc[1, "recorded"] == pytest.approx(0.11)
    v = judge(rows, mean_check(RECORDED, near), exact=False, rerun_dir=None)
    assert v.ok and v.outside == 0
    assert len(v.means) == 2 and set(v.means["rerun_verdict"]) <= set(stats.VERDICTS)
    far = summary({"acc": [0.30, 0.31], "auc": [-0.2, -0.1]}, seeds=[0, 3], versions=other)
    v = judge(compare(RECORDED, far), mean_check(RECORDED, far), exact=False, rerun_dir=None)
    assert not v.ok and v.outside == 4


def test_one_value_outside_among_many_is_what_chance_gives():
    rng = np.random.default_rng(0)
    metrics = {f"m{i}": list(0.1 + 0.01 * rng.standard_normal(5)) for i in range(20)}
    recorded = summary(metrics)
    rerun_values = {k: [float(np.mean(v))] for k, v in metrics.items()}
    rerun_values["m0"] = [1.0]                       # one of 20 far outside
    rerun = summary(rerun_values, seeds=[0], commit="def")
    v = judge(compare(recorded, rerun), mean_check(recorded, rerun), exact=False, rerun_dir=None)
    assert v.outside == 1 and v.ok
    for k in ("m1", "m2", "m3"):                     # four of 20: more than chance
        rerun_values[k] = [1.0]
    rerun = summary(rerun_values, seeds=[0], commit="def")
    v = judge(compare(recorded, rerun), mean_check(recorded, rerun), exact=False, rerun_dir=None)
    assert v.outside == 4 and not v.ok and v.p_value < 0.05


def test_a_rerun_missing_a_recorded_decision_is_refused():
    rerun = summary({"acc": [0.10]}, seeds=[0])
    with pytest.raises(ValueError, match="did not decide"):
        compare(RECORDED, rerun)


def test_recorded_parameters_keep_the_notebooks_own_minus_what_verify_sets():
    params = recorded_parameters(RECORDED, ["source", "rounds", "quick", "jobs", "seeds", "lr"])
    assert params == {"source": "breastmnist", "rounds": 20}


def test_the_notebook_is_found_from_the_run_folder(tmp_path):
    books = list_notebooks()
    assert notebook_for(tmp_path / "full" / "x" / "04_personalization", books).name == "04_personalization.ipynb"
    with pytest.raises(ValueError, match="named after the notebook"):
        notebook_for(tmp_path / "elsewhere", books)


def test_bad_run_folders_and_seeds_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        verify(tmp_path)
    run = tmp_path / "04_personalization"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(RECORDED))
    with pytest.raises(ValueError, match=r"seed\(s\) \[7\] are not in the recording"):
        verify(run, seeds=[7])
    old = copy.deepcopy(RECORDED)
    del old["seeds"]
    with pytest.raises(ValueError, match="records no seeds"):
        run_seeds(old)


def test_cli_refuses_bad_seeds_with_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "medchain", "verify", "results", "--seeds", "1,1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "distinct" in proc.stderr


def test_a_one_seed_recording_elsewhere_verifies_only_identical_numbers():
    recorded = summary({"acc": [0.10]}, seeds=[0])
    other = dict(VERSIONS, cpu_capability="AVX2")
    same = summary({"acc": [0.10]}, seeds=[0], versions=other)
    v = judge(compare(recorded, same), mean_check(recorded, same), exact=False, rerun_dir=None)
    assert v.ok and "one seed" in v.text()
    moved = summary({"acc": [0.11]}, seeds=[0], versions=other)
    v = judge(compare(recorded, moved), mean_check(recorded, moved), exact=False, rerun_dir=None)
    assert not v.ok and "NOT VERIFIED" in v.text()
