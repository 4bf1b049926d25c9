# Two commands: `make demo` runs the main job on its defaults, `make test` runs the test suite.
# Both create .venv and install on first use (CPU torch, pinned: an unpinned torch pulls a CUDA build), with
# the optional extras (diffusers, ray) so that the tests of import-diffusers and --ray always run.
# `make format` rewrites the tree in the house style (ruff format, then ruff check --fix).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
RUNS ?= runs

.PHONY: demo test format install bench ablations clean

$(BIN)/rl-diffusion: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,diffusers,ray]'
	touch $@

install: $(BIN)/rl-diffusion

demo: install
	$(BIN)/python scripts/demo.py --runs $(RUNS)

# lint runs first, so style never depends on memory; the tests run on one worker per core (pytest-xdist),
# each with one torch thread (tests/conftest.py)
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n auto --dist worksteal tests

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python scripts/bench_pretrain.py
	$(BIN)/python scripts/bench_rl.py
	$(BIN)/python scripts/bench_images.py

ablations: install
	$(BIN)/python scripts/ablations.py

clean:
	rm -rf $(VENV) *.egg-info
