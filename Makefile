# Two entry points for a fresh machine; each creates .venv when missing.
#   make serve   set up, then run the main job
#   make test    set up, then run the whole test suite
# TORCH_INDEX: the pip index torch comes from. Left empty, `torch==2.13.0` comes from PyPI, whose default build
# brings CUDA libraries (several GB); on a machine without a GPU take the CPU build:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_INDEX ?=

CONFIG ?=

.PHONY: serve test setup clean

setup: $(STAMP)

# torch first and pinned: an unpinned requirement could pull a newer release (and another set of CUDA wheels).
$(STAMP): pyproject.toml
	@echo "moeserve set-up [1/3]: a virtual environment in $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "moeserve set-up [2/3]: torch 2.13.0$(if $(TORCH_INDEX), from $(TORCH_INDEX)), the largest download"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on "torch==2.13.0" \
		$(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	@echo "moeserve set-up [3/3]: moeserve, Ray, gRPC and the test tools (transformers, openai, triton)"
	$(BIN)/python -m pip install --disable-pip-version-check --progress-bar on -e ".[test]"
	touch $(STAMP)
	@echo "moeserve set-up: done; the commands are in $(BIN) (moeserve, python)"

# The shipped demo model on the default disaggregated layout, HTTP on 127.0.0.1:8000, gRPC on 127.0.0.1:9000;
# CONFIG=cluster.yaml serves another model or layout. Ctrl-C drains and stops.
serve: $(STAMP)
	$(BIN)/moeserve serve $(if $(CONFIG),--config "$(CONFIG)")

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build dist *.egg-info
