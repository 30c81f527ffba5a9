"""`medchain reproduce`: parameters reach the notebooks, parallel jobs give the same table as one
job, and a notebook that writes no summary is named in the error."""
import json

import nbformat
import pytest

from medchain.reproduce import parse_parameters, reproduce


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
    assert set(one.detail) == {"7"} and set(one.holds) == {"yes"}
    # the executed copy sits next to its results
    assert (tmp_path / "b" / "02_second" / "02_second.ipynb").is_file()


def test_only_and_errors_name_the_notebook(books, tmp_path):
    table = reproduce(quick=False, only=["02"], out_dir=tmp_path / "o", progress=False,
                      notebooks_dir=books)
    assert list(table.notebook) == ["02"] and list(table.holds) == ["NO"]
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
