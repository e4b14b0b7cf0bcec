# Two commands from a fresh clone: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard proto/*.proto)

.PHONY: install quickstart test lint proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'

# The main job: a live system on this machine (grows with each component).
quickstart: install
	$(BIN)/dominator quickstart

# Two workers (pytest-xdist), one test file each at a time: a file's module fixtures are
# built once. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

# Style and types: ruff, then mypy (its files and settings are in pyproject.toml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Regenerate the committed gRPC modules from proto/*.proto.
proto:
	$(BIN)/python -m fleetlib.wire.generate

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
