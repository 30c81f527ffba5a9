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
