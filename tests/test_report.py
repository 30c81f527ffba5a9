"""medchain report: RESULTS.md is generated from the summaries, and the committed RESULTS.md is
exactly what the committed artifacts give (no hand-typed number)."""
import json
from pathlib import Path

from medchain import report, stats
from medchain.results import REPO


def _summary(tmp_path, name, claim, seeds, verdicts, commit="abc12345ffff"):
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"claim": claim, "dataset": "simulated", "verdicts": verdicts,
                                                "seeds": seeds, "git_commit": commit,
                                                "parameters": {"quick": False}}))


def test_report_tables_come_from_the_summaries(tmp_path):
    v = stats.claim_verdict("claim 1 (iid): x", [
        stats.non_inferiority([-0.01, -0.005, 0.0, -0.002, 0.001], 0.02, a="collaborative", b="centralized"),
        stats.non_inferiority([0.01, 0.02, 0.0, 0.01, 0.02], 0.02, metric="auc", a="collaborative", b="centralized")],
        deciding_metric="acc")
    _summary(tmp_path, "full/sim/01", 1, [0, 1, 2, 3, 4], [v])
    old = {"claim": "claim 2: y", "holds": True, "detail": "0.865 vs 0.878"}
    _summary(tmp_path, "archive/bm/02", 2, [0], [old], commit="def45678aaaa-dirty")
    text = report.render(tmp_path)
    assert "| full/sim/01<br>(notebook defaults) | simulated | full | 5 | claim 1 (iid): x | **holds** |" in text
    d = v["decisions"][0]
    assert f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] points → holds" in text
    assert "inconclusive (1 seed; the run itself said holds)" in text and "*dirty*" in text
    assert "Claim 3" in text and "No committed run yet." in text
    assert "Superseded" not in text
    _summary(tmp_path, "archive/v1/sim/01", 1, [0, 1, 2, 3, 4], [v])   # a replaced multi-seed run
    text = report.render(tmp_path)
    current, superseded = text.split("## Claim 1")[1].split("## Claim 2")[0].split("Superseded multi-seed runs")
    assert "full/sim/01" in current and "archive/v1/sim/01" not in current
    assert "archive/v1/sim/01" in superseded
    out = report.write(tmp_path, tmp_path / "R.md")
    assert report.check(tmp_path, out) == []
    out.write_text(out.read_text().replace("holds", "fails", 1))
    assert report.check(tmp_path, out)


def test_committed_results_md_matches_the_committed_artifacts():
    diff = report.check(REPO / "results", REPO / "RESULTS.md")
    assert diff == [], "RESULTS.md is out of date: run `medchain report`\n" + "\n".join(diff[:40])


def test_report_lists_claim_1_scores_per_method(tmp_path):
    d = tmp_path / "full/bm/01"
    d.mkdir(parents=True)
    v = stats.claim_verdict("claim 1 (iid): x", [stats.non_inferiority([0.0, 0.01, -0.01], 0.02)],
                            deciding_metric="acc")
    methods = {"centralized": {k: stats.describe([0.80, 0.82, 0.81]) for k in ("acc", "balanced_acc", "auc")}}
    (d / "summary.json").write_text(json.dumps({"claim": 1, "dataset": "bm", "verdicts": [v], "seeds": [0, 1, 2],
                                                "git_commit": "abc", "partitions": {"iid": {"methods": methods}}}))
    text = report.render(tmp_path)
    c = methods["centralized"]["acc"]
    assert f"| full/bm/01 | iid | centralized | 0.810 [{c['ci_low']:.3f}, {c['ci_high']:.3f}] |" in text


def test_settings_name_what_differs_from_the_notebook_defaults():
    run = {"claim": 1, "summary": {"parameters": {"source": "breastmnist", "rounds": 20, "quick": False,
                                                  "collab": {"local_epochs": 1, "lr": 0.002}}}}
    assert report.settings_text(run) == "source=breastmnist, local_epochs=1"
    run["summary"]["parameters"] = {"rounds": 20}
    assert report.settings_text(run) == "notebook defaults"


def test_report_lists_each_claim_1_method_with_gaps_diagnostics_and_chain_cost(tmp_path):
    d = tmp_path / "full/sim/01"
    d.mkdir(parents=True)
    v = stats.claim_verdict("claim 1 (sites): x", [stats.non_inferiority([-0.1, -0.12, -0.11], 0.02)],
                            deciding_metric="acc")
    gap, worst = stats.describe([-0.10, -0.12, -0.11]), stats.describe([-0.20, -0.25, -0.30])
    m = {k: stats.describe([0.8, 0.81, 0.79]) for k in ("acc", "balanced_acc", "auc")}
    diag = {k: {"method": stats.describe([0.9, 1.1, 1.0]), "centralized": stats.describe([0.2, 0.3, 0.25])}
            for k in ("loss", "ece", "bn_distance")}
    m.update({"gap": {"acc": gap}, "worst_site": {"acc": stats.describe([0.6, 0.62, 0.64])},
              "gap_worst_site": {"acc": worst}, "lr": [0.002, 0.005, 0.002], "chosen_in_seeds": [0, 2],
              "worst_gap_site_diagnostics": diag,
              "chain": {"upload_bytes_per_round": 4.2e6, "update_gas_per_round": 409740.6, "values_per_update": 1}})
    (d / "summary.json").write_text(json.dumps({"claim": 1, "dataset": "sim", "verdicts": [v], "seeds": [0, 1, 2],
                                                "git_commit": "abc",
                                                "partitions": {"sites": {"methods": {"collaborative[scaffold]": m}}}}))
    text = report.render(tmp_path)
    line = next(x for x in text.splitlines() if x.startswith("| full/sim/01 | sites | collaborative[scaffold] | 0.002, 0.005 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == f"-11.0 [{100 * gap['ci_low']:+.1f}, {100 * gap['ci_high']:+.1f}]"
    assert cells[6].startswith("-25.0 [")
    assert cells[7:10] == ["1.00 / 0.25", "1.000 / 0.250", "1.000 / 0.250"]
    assert cells[10:] == ["4.20", "409,741", "[0, 2]"]
