# The front door: `make run` and `make test` work from a fresh clone (Python 3.11, pip reaching PyPI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test serve lint bench train-tiny clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Greedy continuation from the embedded default model (no arguments, no download).
run: $(STAMP)
	$(PY) -m kimi_jax.generate $(ARGS)

# The whole suite on CPU with 8 fake devices (set in tests/conftest.py), in PYTEST_WORKERS processes
# (pytest-xdist; a test file stays in one); one tier: PYTEST_ARGS="-m parity"; serially: PYTEST_WORKERS=0.
# A worker that crashes ends the run, naming its test: under --dist loadfile xdist can hang after
# replacing one.
PYTEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --max-worker-restart=0 $(PYTEST_ARGS)

# OpenAI/Anthropic-compatible server on 127.0.0.1:8000 (embedded default unless ARGS="--checkpoint PATH").
serve: $(STAMP)
	$(PY) -m kimi_jax.serve $(ARGS)

# ruff, and the import contracts of setup.cfg (import-linter: imports point one way, README "Architecture").
lint: $(TEST_STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check kimi_jax sharding scripts tests
	$(VENV)/bin/lint-imports setup.cfg

bench: $(TEST_STAMP)
	$(PY) scripts/bench.py $(ARGS)

# Rebuild the embedded tiny chat model (kimi_jax/assets/tiny_chat) with MuonClip, seeded (~27 min on 2
# cores); it prints loss, max attention logit and the held-out evaluation, and writes training.json.
train-tiny: $(STAMP)
	$(PY) scripts/train_tiny.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
