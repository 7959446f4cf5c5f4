# Two commands do all set-up on a fresh clone (each creates .venv on first use, idempotently):
#   make run    the main job on the embedded default data (no downloads)
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.karma-installed
EXTRAS ?= test,bench,hf,st,faiss,ray,data

.PHONY: setup run test bench bench-quick clean

$(STAMP): requirements-cpu.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m karma ablate

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -q

bench-quick: $(STAMP)
	KARMA_BENCH_QUICK=1 $(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info karma_kernels/*.so
