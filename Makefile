# Two entry points for a fresh machine; each creates .venv when missing.
#   make serve   set up, then run the main job
#   make test    set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

MODEL ?=
PROMPT ?= def fibonacci(
MAX_TOKENS ?= 64

.PHONY: serve test setup clean

setup: $(STAMP)

# torch is installed first and pinned: on a CPU machine `torch==2.13.0` resolves to the CPU build, and an
# unpinned requirement could pull a newer release with gigabytes of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

serve: $(STAMP)
	@test -n "$(MODEL)" || { echo "usage: make serve MODEL=path/to/checkpoint [PROMPT='...']"; exit 2; }
	$(BIN)/moeserve generate --model "$(MODEL)" --prompt "$(PROMPT)" --max-tokens $(MAX_TOKENS)

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info
