"""`medchain reproduce`: parameters reach the notebooks, parallel jobs give the same table as one
job, a failing notebook is reported at the end without stopping the others, path parameters are
read from the caller's directory, and verdict tables show the summaries' verdicts."""
import json
from pathlib import Path

import nbformat
import pytest

from medchain.reproduce import (NotebooksFailed, parse_parameters, reproduce, resolve_paths,
                                verdict_table)


def _notebook(path, name, *, writes_summary=True):
    params = nbformat.v4.new_code_cell('quick = False\nout_dir = "."\nvalue = 1')
    params.metadata["tags"] = ["parameters"]
    body = (
        "import json, pathlib\n"
        f"out = pathlib.Path(out_dir) / {name!r}\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'summary.json').write_text(json.dumps({'verdict': {'claim': 'c' + str(value), "
        "'holds': bool(quick), 'detail': str(value)}}))\n"
    )
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body if writes_summary else "x = 1")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path / f"{name}.ipynb")


@pytest.fixture
def books(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    for name in ("01_first", "02_second", "03_third"):
        _notebook(d, name)
    return d


def test_parse_parameters_reads_yaml_values():
    assert parse_parameters(["source=breastmnist", "rounds=30", "partitions=[iid, sites]",
                             "quick=true", "lr=2e-3"]) == {
        "source": "breastmnist", "rounds": 30, "partitions": ["iid", "sites"], "quick": True,
        "lr": pytest.approx(2e-3, abs=1e-12)}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_parameters(["rounds"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_parameters(["not a name=3"])


def test_parallel_jobs_give_the_same_table_and_pass_parameters(books, tmp_path):
    one = reproduce(quick=True, out_dir=tmp_path / "a", parameters={"value": 7}, jobs=1,
                    progress=False, notebooks_dir=books)
    two = reproduce(quick=True, out_dir=tmp_path / "b", parameters={"value": 7}, jobs=2,
                    progress=False, notebooks_dir=books)
    assert list(one.notebook) == ["01", "02", "03"]
    assert one.equals(two)
    assert set(one.detail) == {"7"} and set(one.verdict) == {"yes"}
    # the executed copy sits next to its results
    assert (tmp_path / "b" / "02_second" / "02_second.ipynb").is_file()


def test_only_and_errors_name_the_notebook(books, tmp_path):
    table = reproduce(quick=False, only=["02"], out_dir=tmp_path / "o", progress=False,
                      notebooks_dir=books)
    assert list(table.notebook) == ["02"] and list(table.verdict) == ["NO"]
    with pytest.raises(ValueError, match=r"no notebook \['09'\]"):
        reproduce(only=["09"], out_dir=tmp_path / "o", progress=False, notebooks_dir=books)
    with pytest.raises(ValueError, match="02_second.ipynb has no parameter valu; its parameters are quick, "
                                         "out_dir, value"):
        reproduce(only=["02"], parameters={"valu": 3}, out_dir=tmp_path / "o", progress=False,
                  notebooks_dir=books)
    with pytest.raises(ValueError, match="jobs"):
        reproduce(jobs=0, out_dir=tmp_path / "o", progress=False, notebooks_dir=books)
    _notebook(books, "04_silent", writes_summary=False)
    with pytest.raises(RuntimeError, match="04_silent.ipynb ran but wrote no"):
        reproduce(only=["04"], out_dir=tmp_path / "o", jobs=2, progress=False, notebooks_dir=books)



def _raw_notebook(path: Path, params: str, body: str) -> Path:
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_a_failing_notebook_does_not_stop_the_others(books, tmp_path):
    """jobs=2: 02 raises at once while 01 and 03 are still running (they sleep first); both
    finish and write their summaries, then the failure is reported with its executed copy."""
    for name in ("01_first", "03_third"):
        nb = nbformat.read(books / f"{name}.ipynb", as_version=4)
        nb.cells[1].source = "import time\ntime.sleep(2)\n" + nb.cells[1].source
        nbformat.write(nb, books / f"{name}.ipynb")
    _raw_notebook(books / "02_second.ipynb", 'quick = False\nout_dir = "."\nvalue = 1',
                  'raise ValueError("broken on purpose")')
    out = tmp_path / "res"
    for jobs in (2, 1):
        with pytest.raises(NotebooksFailed) as info:
            reproduce(quick=True, out_dir=out / str(jobs), jobs=jobs, progress=False,
                      notebooks_dir=books)
        err = info.value
        assert isinstance(err, RuntimeError)           # the CLI turns it into a non-zero exit
        assert [f["notebook"] for f in err.failures] == ["02_second.ipynb"]
        executed = out / str(jobs) / "02_second" / "02_second.ipynb"
        assert err.failures[0]["executed"] == str(executed) and executed.is_file()
        assert "ValueError: broken on purpose" in err.failures[0]["error"]
        assert f"1 of 3 notebooks failed:\n  02_second.ipynb: ValueError: broken on purpose" in str(err)
        assert str(executed) in str(err)
        # the others ran to their end
        assert list(err.table.notebook) == ["01", "03"] and set(err.table.verdict) == {"yes"}
        for name in ("01_first", "03_third"):
            assert (out / str(jobs) / name / "summary.json").is_file()


def test_path_parameters_resolve_against_the_callers_directory(tmp_path, monkeypatch):
    """-p source=rel/file.npz and --out rel/ name paths under the caller's directory, not under
    notebooks/ where the notebook executes."""
    books = tmp_path / "repo" / "notebooks"
    books.mkdir(parents=True)
    _raw_notebook(books / "01_read.ipynb", 'quick = False\nout_dir = "."\nsource = "simulated"',
                  "import json, pathlib\n"
                  "text = pathlib.Path(source).read_text() if source.endswith('.txt') else source\n"
                  "out = pathlib.Path(out_dir) / '01_read'\n"
                  "out.mkdir(parents=True, exist_ok=True)\n"
                  "(out / 'summary.json').write_text(json.dumps({'verdict': {'claim': 'read', "
                  "'holds': True, 'detail': text}}))\n")
    caller = tmp_path / "caller"
    (caller / "rel").mkdir(parents=True)
    (caller / "rel" / "data.txt").write_text("from the caller")
    monkeypatch.chdir(caller)
    table = reproduce(out_dir=Path("myres"), parameters={"source": "rel/data.txt"}, jobs=1,
                      progress=False, notebooks_dir=books)
    assert list(table.detail) == ["from the caller"]
    assert (caller / "myres" / "01_read" / "summary.json").is_file()
    assert not (books / "myres").exists()
    # -p out_dir=rel is the results folder too, relative to the caller
    reproduce(parameters={"out_dir": "other"}, jobs=1, progress=False, notebooks_dir=books)
    assert (caller / "other" / "01_read" / "01_read.ipynb").is_file()
    # names that are not paths stay as given
    assert reproduce(parameters={"source": "simulated:n=10"}, out_dir=caller / "o", jobs=1,
                     progress=False, notebooks_dir=books).detail.tolist() == ["simulated:n=10"]


def test_resolve_paths_rules(tmp_path):
    (tmp_path / "flat.npz").write_bytes(b"")
    got = resolve_paths({"a": "flat.npz", "b": "rel/missing.npz", "c": "breastmnist",
                         "d": "simulated:n=100,sites=2", "e": "http://127.0.0.1:8545",
                         "f": "/abs/x.npz", "g": 3, "h": ["iid", "sites"], "i": "~/x.npz"},
                        cwd=tmp_path)
    assert got["a"] == str(tmp_path / "flat.npz") and got["b"] == str(tmp_path / "rel/missing.npz")
    assert got["c"] == "breastmnist" and got["d"] == "simulated:n=100,sites=2"
    assert got["e"] == "http://127.0.0.1:8545" and got["f"] == "/abs/x.npz"
    assert got["g"] == 3 and got["h"] == ["iid", "sites"]
    assert got["i"] == str(Path.home() / "x.npz")


def test_verdict_table_reads_the_verdict_schema(tmp_path):
    """`verdict` ("holds" / "fails" / "inconclusive (...)") is shown when present, with holds
    possibly None; older summaries with only `holds` show yes / NO."""
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"verdicts": [
        {"claim": "a", "verdict": "holds", "holds": True, "detail": "d1"},
        {"claim": "b", "verdict": "fails", "holds": False, "detail": "d2"},
        {"claim": "c", "verdict": "inconclusive (interval too wide: 1 seed)", "holds": None,
         "detail": "d3"}]}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"verdict": {"claim": "d", "holds": False, "detail": "d4"}}))
    table = verdict_table({"01": new, "02": old})
    assert table.verdict.tolist() == ["holds", "fails", "inconclusive (interval too wide: 1 seed)", "NO"]
    assert table.claim.tolist() == ["a", "b", "c", "d"] and table.notebook.tolist() == ["01"] * 3 + ["02"]


# ------------------------------------------------------------------ cost estimate of a full run
from medchain import costs as rp  # noqa: E402
from medchain.reproduce import list_notebooks  # noqa: E402

RATES = {"train_images_per_s": 800.0, "chain_tx_per_s": 40.0}


def test_work_seconds_is_training_plus_two_transactions_per_member_and_round():
    w = rp.Work(train_images=8000, chain_rounds=10, institutions=5)
    assert rp.work_seconds(w, RATES) == pytest.approx(8000 / 800 + 10 * 2 * 5 / 40)
    a = rp.Work(train_images=8000, chain_rounds=10, institutions=5, attack_steps=600)
    assert rp.work_seconds(a, RATES) == pytest.approx(rp.work_seconds(w, RATES))     # no rate: not timed
    assert rp.work_seconds(a, {**RATES, "attack_steps_per_s": 30.0}) == pytest.approx(8000 / 800 + 10 * 2 * 5 / 40 + 20)
    assert "(not timed)" in rp.format_estimate([{"notebook": "02", "work": a, "seconds": 1.0}], RATES)
    assert "(not timed)" not in rp.format_estimate([{"notebook": "02", "work": a, "seconds": 1.0}],
                                                   {**RATES, "attack_steps_per_s": 30.0})


def test_n_train_images_from_the_source_parameter():
    assert rp.n_train_images("simulated", 10000) == 7000
    assert rp.n_train_images("breastmnist") == 546 and rp.n_train_images("medmnist:breastmnist") == 546
    assert rp.n_train_images("/data/mine.npz") is None


def test_cost_models_count_passes_from_the_parameters():
    p01 = {"source": "simulated", "sim_n": 1000, "partitions": ["iid", "sites"], "institutions": 5,
           "rounds": 4, "local_epochs": 2, "baseline_epochs": None, "with_reference": True, "seeds": [0, 1]}
    w = rp._work_01(p01)   # 2 seeds × 2 partitions × 700 images × (8 collaborative + 8 reference + 2 × 8 baselines)
    assert (w.train_images, w.chain_rounds, w.institutions) == (2 * 2 * 700 * 32, 2 * 2 * 4, 5)
    assert rp._work_01({**p01, "with_reference": False, "baseline_epochs": 1}).train_images == 2 * 2 * 700 * 10
    assert rp._work_01({**p01, "seeds": None}).train_images == rp.DEFAULT_SEEDS / 2 * w.train_images
    assert rp._work_01({**p01, "source": "x.npz"}) is None
    # 03: 140 target training images × 0.1 over 2 institutions = 7 each: one step of 32 an epoch, so 8
    # epochs for 8 steps a round; chain arms: none, warm start / L2-SP from each of 2 sources = 5;
    # pooled with the similar source only (not the unrelated one), 3 epochs over 700 + 700 images
    p03 = {"pair": "ct_detection", "relations": ["similar", "unrelated"], "source_n": 1000, "target_n": 200,
           "target_sites": 2, "target_institutions": None, "source_rounds": 3, "source_local_epochs": 1,
           "fractions": [0.1], "methods": ["warm_start", "l2sp", "probe", "pooled"], "pooled_epochs": None,
           "seeds": [0], "rounds": 2, "min_local_steps": 8, "batch_size": 32}
    w = rp._work_03(p03)
    digits = 1257
    assert w.train_images == (700 + digits) * 3 + 5 * (2 * 8 * 7 * 2) + 2 * 700 * 3
    assert w.chain_rounds == 2 * 3 + 5 * 2
    assert rp._work_03({**p03, "pair": "unknown"}) is None
    retina = rp._work_03({**p03, "pair": "retina_referable", "source_share": 0.5, "target_institutions": 2})
    assert retina.train_images > 0 and retina.institutions == 2
    from medchain.experiments.privacy import DEFENCES
    assert rp._privacy_runs({"defences": ["none", "bn_local"]}) == 2
    assert rp._privacy_runs({"defences": None}) == len(DEFENCES)


def test_estimate_of_the_real_notebooks_and_its_text():
    books = list_notebooks()
    rows = rp.estimate(books, list(books), rates=RATES)
    assert [r["notebook"] for r in rows] == [p.name for p in books.values()]
    assert all(r["seconds"] > 600 for r in rows), rows          # full defaults: well beyond quick mode
    one = rp.estimate(books, ["01"], {"seeds": [0]}, rates=RATES)[0]
    assert one["seconds"] == pytest.approx(rows[0]["seconds"] / rp.DEFAULT_SEEDS)
    assert rp.estimate(books, ["01"], {"source": "some/file.npz"}, rates=RATES)[0]["work"] is None
    text = rp.format_estimate(rows + [{"notebook": "05_new.ipynb", "work": None, "seconds": None}], RATES, jobs=2)
    assert "05_new.ipynb: no estimate" in text and "total: ~" in text and "800 images/s" in text
    assert text.count(" of one core (") == len(rows)


def test_measured_rates_read_the_benchmark_results(tmp_path):
    rates = rp.measured_rates()
    assert rates["train_images_per_s"] > 0 and rates["chain_tx_per_s"] > 0
    with pytest.raises(FileNotFoundError, match="bench_training.py"):
        rp.measured_rates(tmp_path)


def test_cli_prints_the_estimate_before_a_full_run_only(monkeypatch, capsys):
    import pandas as pd

    from medchain.cli import main

    def fake(**kw):
        print("RUN quick" if kw["quick"] else "RUN full")
        return pd.DataFrame(columns=["notebook", "claim", "verdict", "detail"])
    monkeypatch.setattr("medchain.reproduce.reproduce", fake)
    assert main(["reproduce", "--only", "01,03", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.index("estimated cost") < out.index("RUN full")
    assert "01_centralized_vs_collaborative.ipynb: ~" in out and "03_cross_chain_transfer.ipynb: ~" in out
    assert "04_personalization" not in out
    assert main(["reproduce", "--quick", "--only", "01"]) == 0
    assert "estimated cost" not in capsys.readouterr().out
