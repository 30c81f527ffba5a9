"""The committed notebooks are clean sources: no outputs or execution counts (executed copies live
in results/<notebook>/), no papermill `injected-parameters` cell (it would silently override the
parameters when the notebook is opened in JupyterLab), exactly one `parameters` cell, and no
absolute paths of the machine that last ran them. Strip a notebook with
`jupyter nbconvert --clear-output --inplace` and delete any `injected-parameters` cell."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MACHINE_PATH = re.compile(r"/root\b|/home/|/work/|/Users/|site-packages")


def problems(path: Path) -> list[str]:
    """What keeps the notebook at ``path`` from being a clean source (empty when clean)."""
    text = Path(path).read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    found = []
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    with_outputs = [i for i, c in code if c.get("outputs")]
    if with_outputs:
        found.append(f"outputs in cells {with_outputs}")
    counted = [i for i, c in code if c.get("execution_count") is not None]
    if counted:
        found.append(f"execution counts in cells {counted}")
    tags = [(i, c.get("metadata", {}).get("tags", [])) for i, c in enumerate(nb.cells)]
    injected = [i for i, t in tags if "injected-parameters" in t]
    if injected:
        found.append(f"papermill injected-parameters cell(s) {injected}")
    params = [i for i, t in tags if "parameters" in t]
    if len(params) != 1:
        found.append(f"{len(params)} cells tagged 'parameters' (need exactly one): {params}")
    paths = sorted(set(MACHINE_PATH.findall(text)))
    if paths:
        found.append(f"absolute machine paths {paths}")
    return found


def test_there_are_four_claim_notebooks():
    assert len(NOTEBOOKS) == 4, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_clean(path):
    assert problems(path) == [], (
        f"{path.name} is not a clean source: {problems(path)}. Strip it: jupyter nbconvert "
        f"--clear-output --inplace {path.name}, and delete any 'injected-parameters' cell")


def test_the_check_finds_each_problem(tmp_path):
    """The checker itself: a clean notebook passes; each kind of dirt is named."""
    params = nbformat.v4.new_code_cell("quick = False")
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell("x = 1")])
    clean = tmp_path / "clean.ipynb"
    nbformat.write(nb, clean)
    assert problems(clean) == []

    injected = nbformat.v4.new_code_cell("quick = True", execution_count=2)
    injected.metadata["tags"] = ["injected-parameters"]
    body = nbformat.v4.new_code_cell("x = 1", execution_count=3, outputs=[nbformat.v4.new_output(
        "stream", name="stderr", text="/root/.venv/lib/python3.11/site-packages/tqdm: TqdmWarning")])
    dirty = nbformat.v4.new_notebook(cells=[params, injected, body])
    nbformat.write(dirty, tmp_path / "dirty.ipynb")
    found = " | ".join(problems(tmp_path / "dirty.ipynb"))
    for what in ("outputs in cells [2]", "execution counts in cells [1, 2]",
                 "injected-parameters cell(s) [1]", "/root", "site-packages"):
        assert what in found, found

    nb.cells[1].metadata["tags"] = ["parameters"]
    nbformat.write(nb, tmp_path / "two.ipynb")
    assert problems(tmp_path / "two.ipynb") == [
        "2 cells tagged 'parameters' (need exactly one): [0, 1]"]


def test_papermill_reads_every_parameter_of_every_notebook():
    """A parameter line papermill cannot parse (e.g. an '=' inside its comment) is silently missing
    from inspect_notebook, so `medchain reproduce -p NAME=...` would refuse it as unknown."""
    import ast

    import papermill as pm

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        names = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                 for t in node.targets}
        assert names <= set(pm.inspect_notebook(str(path))), (path.name, names - set(pm.inspect_notebook(str(path))))
