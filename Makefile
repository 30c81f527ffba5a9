# Set-up and entry points. The README gives two commands: `make reproduce` and `make test`.
# Each creates its own virtual environment (.venv) with torch pinned, installs the Python side
# within constraints.txt (the versions the tests pass with), and the npm packages (solc, anvil)
# where needed.
#
# CPU-only torch on an ordinary machine (no multi-GB CUDA build):
#     make reproduce TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Empty TORCH_INDEX (the default, and CI) takes torch from pip's configured indexes, which on the
# project's machines hold the CPU wheel.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH       := torch==2.13.0
TORCH_INDEX ?=
# Pinned versions of everything else (Python 3.11 lines); `make venv CONSTRAINTS=` installs the
# newest releases that pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
PIP_C       := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# Extra JupyterLab options, e.g. make lab LAB_ARGS="--no-browser --port 8890"
LAB_ARGS    ?=

.PHONY: venv node lab reproduce reproduce-full test test-fast bench constraints clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet $(PIP_C) -e ".[test]"
	touch $@

# solc (recompile test) and anvil (real-node tests, `medchain chain up`) come from npm.
node: contracts/node_modules/.installed
contracts/node_modules/.installed: contracts/package.json contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund
	touch $@

# JupyterLab (the [lab] extra) on the repository, opened at notebooks/.
$(VENV)/.lab-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet $(PIP_C) -e ".[test,lab]"
	touch $@

lab: $(VENV)/.lab-installed
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

reproduce: venv node
	$(VENV)/bin/medchain reproduce --quick

reproduce-full: venv node
	$(VENV)/bin/medchain reproduce

# The notebook tests execute every notebook in quick mode into temporary folders: nothing is
# written to results/ or to the committed notebooks.
test: venv node
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: venv node
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# Re-pin constraints.txt to what the venv holds (after a deliberate upgrade that passes the tests).
constraints:
	@test -x $(PY) || { echo "no $(PY): run make venv first"; exit 1; }
	v=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable \
	  | grep -v -i -E '^(torch|medchain)[=@ ]|^-e |^#' \
	  | sed "s/\$$/ ; python_version == \"$$v\"/"; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Removes the environment and the outputs git ignores (quick-mode results/<notebook>/ etc.);
# committed files (results/full/, results/README.md) and untracked files you made are kept.
clean:
	rm -rf $(VENV) contracts/node_modules .pytest_cache
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then git clean -fdX -- results/; \
	else echo "not a git checkout: results/ left as it is"; fi
