# Set-up and entry points. The README gives two commands: `make reproduce` and `make test`.
# Each creates its own virtual environment (.venv) with the CPU build of torch pinned, so no
# CUDA build is ever pulled, and installs the npm packages (solc, anvil) where needed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: venv node reproduce reproduce-full test test-fast bench clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# solc (recompile test) and anvil (real-node tests, `medchain chain up`) come from npm.
node: contracts/node_modules/.installed
contracts/node_modules/.installed: contracts/package.json contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund
	touch $@

reproduce: venv node
	$(VENV)/bin/medchain reproduce --quick

reproduce-full: venv node
	$(VENV)/bin/medchain reproduce

test: venv node
	$(PY) -m pytest -q -p no:cacheprovider tests --nbval-lax notebooks

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv node
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) contracts/node_modules results/*/ .pytest_cache
