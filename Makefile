# Two entry points for a fresh machine; each creates .venv when missing.
#   make serve   set up, then run the main job
#   make test    set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CONFIG ?=

.PHONY: serve test setup clean

setup: $(STAMP)

# torch is installed first and pinned: on a CPU machine `torch==2.13.0` resolves to the CPU build, and an
# unpinned requirement could pull a newer release with gigabytes of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

# The shipped demo model on the default disaggregated layout, HTTP on 127.0.0.1:8000, gRPC on 127.0.0.1:9000;
# CONFIG=cluster.yaml serves another model or layout. Ctrl-C drains and stops.
serve: $(STAMP)
	$(BIN)/moeserve serve $(if $(CONFIG),--config "$(CONFIG)")

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info
