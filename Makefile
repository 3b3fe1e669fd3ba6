# The two commands of the README:
#   make demo   set up .venv and run the main job on the bundled sample
#   make test   set up .venv (with test extras) and run the regression suite through ctest
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Torch is installed first and explicitly, only when the environment has none. Override with
# your own CUDA build, e.g.  make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH  ?= torch==2.13.0
BUILD  ?= build

.PHONY: demo test venv venv-test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[train]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

demo: venv
	$(PY) -m XctDiffCore demo --out out/demo

test: venv-test
	cmake -S . -B $(BUILD) -DPython3_EXECUTABLE=$(abspath $(PY)) > /dev/null
	cd $(BUILD) && ctest --output-on-failure

clean:
	rm -rf $(BUILD) out
