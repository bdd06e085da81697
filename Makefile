# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: install demo test test-slow test-browser lint format bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[dev,notebooks]"
	touch $(STAMP)

install: $(STAMP)

# The main job end to end on the embedded default model, on the CPU.
demo: $(STAMP)
	$(PY) -m tsr examples/*.png --pretrained tiny --output-dir outputs/demo --mc-resolution 128

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	SMOKE=1 $(PY) -m pytest -q -m "not slow and not browser" tests $(if $(NOTEBOOKS),--nbmake $(NOTEBOOKS))

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

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
