# The commands of the README:
#   make demo   set up .venv and run the main job on the bundled sample
#   make test   set up .venv (with test extras) and run the regression suite through ctest
#   make slicer set up .venv with the slicer-core wheel (MRML + VTK): the README's console example
#               runs outside Slicer without the whole test environment
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Torch is installed first and explicitly, only when the environment has none. Override with
# your own CUDA build, e.g.  make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
TORCH  ?= torch==2.13.0
BUILD  ?= build
# The slicer-core the test environment gets (trame-slicer 2.0.0 of requirements-test.txt pins this range).
SLICER_CORE ?= slicer-core>=5.11.0.6,<5.12

.PHONY: demo test slicer venv venv-test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[train]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

$(VENV)/.installed-slicer: $(VENV)/.installed
	$(PY) -m pip install -q "$(SLICER_CORE)"
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test
slicer: $(VENV)/.installed-slicer

demo: venv
	$(PY) -m XctDiffCore demo --out out/demo

test: venv-test
	cmake -S . -B $(BUILD) -DPython3_EXECUTABLE=$(abspath $(PY)) > /dev/null
	cd $(BUILD) && ctest --output-on-failure

clean:
	rm -rf $(BUILD) out
