# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: install demo test test-slow test-browser rehearse lint format bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev,notebooks]"
	touch $(STAMP)

install: $(STAMP)

# The workbook end to end on the embedded default model, on the CPU: the six notebooks in
# order, headless; executed copies and HTML in outputs/notebooks/, the adapter in
# outputs_lora/workbook/, meshes and the evaluation table in outputs/workbook/.
demo: $(STAMP)
	$(PY) scripts/run_notebooks.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	SMOKE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "not slow and not browser" tests $(if $(NOTEBOOKS),--nbmake $(NOTEBOOKS))

# Notebook 04 in JupyterLab in headless Chromium; installs Debian's chromium when missing.
test-browser: $(STAMP)
	@[ -x /usr/bin/chromium ] || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }
	$(PY) -m pytest -q -m browser tests/test_browser.py

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

# Every notebook and CLI against a full-size TripoSR checkpoint (random weights, official
# format, built in outputs/rehearsal/model) on the CPU at CI sizes. Too long for `make test`
# (README, "Using the real TripoSR weights"); `make test-slow` runs it as a test.
rehearse: $(STAMP)
	$(PY) scripts/rehearse.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_mesh.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
