"""Claim 4 across heterogeneity: per-setting decisions over seeds, where personalization pays, the
plot, and a setting in which balanced ACC is undefined everywhere (decided inconclusive, no crash)."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from medchain.experiments.personalization_summary import summarize_seeds
from medchain.experiments.personalization_sweep import (heterogeneity_label, plot_sweep, sweep_sentence,
                                                        sweep_table, where_it_pays)
from medchain.results import save_figure

#: per setting: (gain over the reference, gain over local-only) of the best method, before noise
GAINS = {"dirichlet:0.1": (0.10, 0.05), "dirichlet:10": (0.0, -0.08), "quantity": (None, None)}
NOISE = [0.01, -0.01, 0.02, -0.02, 0.0]


def _seed_run(seed: int) -> dict:
    rows, summaries = [], {}
    for setting, (over_ref, over_loc) in GAINS.items():
        for metric, ref in (("balanced_acc", "global_uniform"), ("acc", "global_prior")):
            for inst in range(3):
                undefined = over_ref is None and metric == "balanced_acc"
                value = math.nan if undefined else 0.7 + 0.01 * inst
                r = 0.0 if undefined else (over_ref or 0.0) + NOISE[seed] + 0.01 * inst
                lo = 0.0 if undefined else (over_loc or 0.0) + NOISE[seed]
                rows.append({"setting": setting, "metric": metric, "method": "fedper", "institution": inst,
                             "value": value, "reference": ref, "reference_value": value - r,
                             "local_only_value": value - lo, "minus_reference": math.nan if undefined else r,
                             "minus_local_only": math.nan if undefined else lo, "best": True,
                             "classes_in_test": 1 if undefined else 2, "seed": seed})
        summaries[setting] = {"global_degenerate": False, "local_coordinates_never_shared": True,
                              "n_test": [100, 100, 40], "test_below_target": [2],
                              "test_one_class": [0, 1, 2] if over_ref is None else []}
    return {"seed": seed, "paired": pd.DataFrame(rows), "summaries": summaries}


@pytest.fixture(scope="module")
def decided():
    return summarize_seeds([_seed_run(s) for s in range(5)], margin=0.0, tolerance=0.01)


def test_per_setting_decisions_and_test_sizes(decided):
    assert list(decided) == list(GAINS)
    v = decided["dirichlet:0.1"]["verdict"]
    assert v["verdict"] == "holds"
    d = {(x["metric"], x["b"]): x for x in v["decisions"]}
    over_ref = d[("balanced_acc", "global + uniform-prior correction")]
    # per seed: mean over the 3 institutions of (0.10 + noise + 0.01 i)
    assert over_ref["values"] == pytest.approx([0.11 + n for n in NOISE])
    assert over_ref["mean"] == pytest.approx(0.11)
    assert d[("balanced_acc", "local only")]["mean"] == pytest.approx(0.05)
    assert d[("balanced_acc_worst_institution", "global + uniform-prior correction")]["values"] == \
        pytest.approx([0.10 + n for n in NOISE])
    assert decided["dirichlet:10"]["verdict"]["verdict"] == "fails"      # local-only wins by 8 points
    t = decided["dirichlet:0.1"]["test_sizes"]
    assert t == {"min": 40, "max": 100, "per_seed": [[100, 100, 40]] * 5, "below_target": 5,
                 "institutions": 15, "one_class": 0}


def test_balanced_acc_undefined_everywhere_is_inconclusive_not_an_error(decided):
    q = decided["quantity"]
    assert q["verdict"]["verdict"] == "inconclusive" and q["test_sizes"]["one_class"] == 15
    bal = [x for x in q["verdict"]["decisions"] if x["metric"].startswith("balanced_acc")]
    assert len(bal) == 3 and all(x["verdict"] == "inconclusive" and x["values"] == [] for x in bal)
    assert "one class" in bal[0]["reason"]
    acc = [x for x in q["verdict"]["decisions"] if x["metric"] == "acc"]
    assert acc and all(len(x["values"]) == 5 for x in acc)               # ACC is still decided


def test_where_it_pays_and_the_table(decided):
    w = where_it_pays(decided)
    assert w["beats_reference"] == ["dirichlet:0.1"] and w["beats_local_only"] == ["dirichlet:0.1"]
    assert w["beats_both"] == ["dirichlet:0.1"] and w["fails_local_only"] == ["dirichlet:10"]
    assert w["not_both"] == ["dirichlet:10", "quantity"]
    assert "Dirichlet α=0.1" in sweep_sentence(w)
    t = sweep_table(decided)
    assert len(t) == 3 * 2 * 3                                           # settings × metrics × comparisons
    row = t[(t.setting == "dirichlet:0.1") & (t.metric == "balanced_acc") & (t.comparison == "over_reference")].iloc[0]
    assert row["mean"] == pytest.approx(0.11) and row.ci_low < 0.11 < row.ci_high and row.n == 5
    assert t[(t.setting == "quantity") & (t.metric == "balanced_acc")]["mean"].isna().all()


def test_plot_sweep_draws_every_setting(decided, tmp_path):
    fig = plot_sweep(decided)
    ax = fig.axes[0]
    assert [x.get_text() for x in ax.get_xticklabels()] == ["Dirichlet α=0.1", "Dirichlet α=10", "quantity skew σ=1"]
    for path in save_figure(fig, tmp_path / "sweep"):
        assert path.stat().st_size > 0


@pytest.mark.parametrize("setting, label", [("dirichlet:0.05", "Dirichlet α=0.05"), ("sites", "natural sites"),
                                            ("quantity:1.5", "quantity skew σ=1.5"), ("iid", "IID")])
def test_heterogeneity_label(setting, label):
    assert heterogeneity_label(setting) == label


def test_report_says_where_personalization_pays(decided, tmp_path):
    import json

    from medchain import report
    d = tmp_path / "full/sim/04_personalization"
    d.mkdir(parents=True)
    summary = {"claim": 4, "dataset": "simulated", "seeds": [0, 1, 2, 3, 4], "git_commit": "abc12345",
               "verdicts": [s["verdict"] for s in decided.values()], "settings": decided,
               "sweep": {"where": {"balanced_acc": where_it_pays(decided)}},
               "parameters": {"quick": False, "test_per_institution": 100}}
    (d / "summary.json").write_text(json.dumps(summary, allow_nan=True))
    text = report.render(tmp_path)
    assert ("- full/sim/04_personalization: beats the matching reference at dirichlet:0.1; beats local-only at "
            "dirichlet:0.1; both at **dirichlet:0.1**; worst institution non-inferior at dirichlet:0.1. "
            "Test images per institution: 40–100 (target 100; 15 of 45 institution-seeds below it, "
            "15 with one class).") in text
    assert text.count("| full/sim/04_personalization") == 3                # one verdict row per setting
