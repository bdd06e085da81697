# Two commands do all set-up on a fresh machine: `make demo` and `make test`; `make lab` opens
# the notebooks in JupyterLab.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# More JupyterLab options, e.g. make lab LAB_ARGS="--no-browser --port 8899".
LAB_ARGS ?=

.PHONY: install lab demo test test-slow test-browser rehearse lint format bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev,notebooks]"
	touch $(STAMP)

install: $(STAMP)

# JupyterLab on notebooks/ with the kernel of .venv. Kernels talk over local sockets (IPC), so
# none warns that it runs over TCP without encryption; root (as in containers) needs --allow-root.
# OMP_WAIT_POLICY as in make demo: spinning OpenMP threads make training ~60x slower on 2 cores.
lab: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m jupyter lab --notebook-dir=notebooks --KernelManager.transport=ipc \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# The workbook end to end on the embedded default model, on the CPU: the six notebooks in
# order, headless; executed copies and HTML in outputs/notebooks/, the adapter in
# outputs_lora/workbook/, meshes and the evaluation table in outputs/workbook/. The terminal
# shows each cell as it starts and each progress bar as it runs; no cell has a time limit
# (training has its own budget); a failing cell is named and fails the target.
demo: $(STAMP)
	$(PY) scripts/run_notebooks.py

# The notebooks run inside the suite, in tests/test_executed_notebooks.py: it executes them as
# `make demo` does (at SMOKE size) and reads what they show; running them under nbmake as well
# would double the time. One notebook alone: pytest --nbmake notebooks/03_training.ipynb
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	SMOKE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m "not slow and not browser" tests

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

# One table: mesh extraction (TripoSR's loop, dense, coarse-to-fine, the default) at 128/256/512
# for the classroom and the full-size model, with time and peak memory: about 2,500 CPU
# seconds, 20-30 min on 2 idle cores. `make bench BENCH_ARGS=--quick` (128/256 classroom, 128
# full-size) is about 200 CPU seconds.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/bench_mesh.py $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache .ruff_cache
