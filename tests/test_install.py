"""The set-up: the Makefile's torch index switch, `make test` without writes into results/, `make
clean` that keeps committed files, constraints.txt consistent with pyproject.toml, environment.yml
consistent with both, and the README's two commands."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
needs_make = pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None,
                                reason="needs GNU make and git")


def _make_n(*args: str, cwd: Path = REPO) -> str:
    """What `make` would run (dry run: nothing is executed). Under `make test` itself (CI) the
    parent's MAKELEVEL/MAKEFLAGS would make it print "Entering directory" lines: drop them."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=cwd, check=True,
                          capture_output=True, text=True, env=env).stdout


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


@needs_make
def test_torch_index_switch(tmp_path):
    venv = f"VENV={tmp_path / 'v'}"
    plain = _make_n("-B", "venv", venv)
    assert re.search(r"pip install --quiet torch==2\.13\.0\s*$", plain, re.M), plain
    assert "--index-url" not in plain
    assert "-c constraints.txt -e \".[test]\"" in plain
    cpu = _make_n("-B", "venv", venv, "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in cpu
    # the constraints never apply to torch's own step (PyTorch's index lacks some pinned versions)
    assert not re.search(r"-c constraints.txt.*torch==", cpu)
    assert "-c constraints" not in _make_n("-B", "venv", venv, "CONSTRAINTS=")


@needs_make
def test_make_test_runs_pytest_only_and_lab_opens_the_notebooks(tmp_path):
    test = _make_n("-B", "test", f"VENV={tmp_path / 'v'}").splitlines()[-1]
    assert "pytest" in test and test.rstrip().endswith("tests")
    assert "nbval" not in test and "notebooks" not in test and "results" not in test
    lab = _make_n("-B", "lab", f"VENV={tmp_path / 'v'}", "LAB_ARGS=--no-browser")
    assert '-e ".[test,lab]"' in lab
    assert "jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks --no-browser" in lab


@needs_make
def test_make_clean_keeps_committed_and_untracked_results(tmp_path):
    """In a scratch git repository with this Makefile and .gitignore: ignored outputs go, the
    committed results/full/ and a user's untracked (not ignored) file stay."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", ".gitignore", "constraints.txt", "pyproject.toml"):
        shutil.copy(REPO / name, repo / name)
    committed = [repo / "results" / "README.md", repo / "results" / "full" / "sim" / "summary.json"]
    for f in committed:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("{}")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=repo, check=True)
    quick = repo / "results" / "01_first" / "summary.json"
    quick.parent.mkdir(parents=True)
    quick.write_text("{}")
    mine = repo / "results" / "full" / "new_run" / "summary.json"     # not committed yet
    mine.parent.mkdir(parents=True)
    mine.write_text("{}")
    (repo / ".venv" / "bin").mkdir(parents=True)
    subprocess.run(["make", "clean"], cwd=repo, check=True, capture_output=True)
    assert all(f.read_text() == "{}" for f in committed) and mine.exists()
    assert not quick.parent.exists() and not (repo / ".venv").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, check=True,
                            capture_output=True, text=True).stdout
    assert status.split() == ["??", "results/full/new_run/"]


def test_constraints_pin_every_dependency_within_pyproject():
    """Every dependency of the package and of its test and lab extras is pinned (torch excepted:
    the Makefile pins it), at a version that pyproject.toml allows; all lines for one Python."""
    tomllib = pytest.importorskip("tomllib")         # Python >= 3.11
    pins = _constraints()
    assert "torch" not in pins and "medchain" not in pins
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in ("test", "lab")
                                      for r in project["optional-dependencies"][extra]]
    for line in reqs:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], line)
    markers = {line.split(";", 1)[1].strip() for line in (REPO / "constraints.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert markers == {'python_version == "3.11"'}


def test_environment_yml_matches_makefile_and_constraints():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps                     # the Python the constraints are for
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    torch_pin = re.search(r"^TORCH\s*:?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert torch_pin in pip
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip
    assert "-c constraints.txt" in pip and '-e ".[test,lab]"' in pip


def test_readme_keeps_two_commands():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make reproduce", "make test"]
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in readme
    assert "environment.yml" in readme and "make lab" in readme and "## Open the notebooks" in readme
