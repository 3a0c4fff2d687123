# Two commands on a fresh machine:
#   make run    fetch the default model pair (first time only), generate with speculation
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test setup soak clean

run: $(STAMP)
	$(VENV)/bin/exo run --enable-speculative $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

setup: $(STAMP)

soak: $(STAMP)
	$(VENV)/bin/python bench/soak.py $(ARGS)

$(STAMP): pyproject.toml scripts/install-system-deps.sh exo/native/small_gemm.c
	./scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(VENV)/bin/python -c 'import exo.blas; exo.blas.main()'  # builds exo's few-row kernel (import never does)
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info
