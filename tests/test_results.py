"""summary.json provenance: versions with the CPU capability, seeds, and dirty trees refused in
full mode unless allowed (then recorded)."""
import json

import pytest

from medchain import results


def test_full_mode_refuses_a_dirty_tree_unless_allowed(monkeypatch):
    monkeypatch.setattr(results, "git_commit", lambda: "abc123-dirty")
    with pytest.raises(RuntimeError, match="allow_dirty=True"):
        results.check_provenance(quick=False)
    p = results.check_provenance(quick=False, allow_dirty=True)
    assert p == {"git_commit": "abc123-dirty", "dirty": True, "allow_dirty": True, "quick": False}
    assert results.check_provenance(quick=True)["dirty"] is True     # quick runs are never published
    monkeypatch.setattr(results, "git_commit", lambda: "abc123")
    assert results.check_provenance(quick=False)["dirty"] is False


def test_summary_records_seeds_versions_and_cpu(tmp_path):
    s = results.write_summary({"x": float("nan")}, tmp_path / "s.json", params={"a": 1}, seeds=[0, 1])
    on_disk = json.loads((tmp_path / "s.json").read_text())
    assert on_disk["seeds"] == [0, 1] and on_disk["x"] is None and "seed" not in on_disk
    for key in ("scipy", "pillow", "torch", "cpu_capability", "torch_threads"):
        assert on_disk["versions"][key], key
    assert s["dirty"] == s["git_commit"].endswith("-dirty")
    one = results.write_summary({}, tmp_path / "t.json", params={}, seed=4)
    assert one["seeds"] == [4] and one["seed"] == 4
    with pytest.raises(ValueError, match="exactly one"):
        results.write_summary({}, tmp_path / "u.json", params={})


def test_verdict_record_has_the_statistical_shape():
    assert results.verdict("c", True, "d")["verdict"] == "holds"
    assert results.verdict("c", False, "d")["verdict"] == "fails"
    v = results.verdict("c", None, "d")
    assert v["verdict"] == "inconclusive" and v["holds"] is None
