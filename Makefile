# Two entry points: `make test` and `make demo`. Each creates or refreshes .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the builds that pip finds on our machines' local disk (a CUDA build
# that also runs on CPU); elsewhere pip downloads the same versions.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_run
# Kubernetes manifest checkers for tests/test_deploy.py, in a venv of their own (checkov pins
# packages the main venv needs at other versions).
K8S_VENV ?= .venv-k8s
K8S_TOOLS ?= kubernetes-validate==1.37.0 checkov==3.3.30

.PHONY: venv k8s-tools test test-fast demo clean

venv: $(VENV)/.installed

k8s-tools: $(K8S_VENV)/.installed

$(K8S_VENV)/.installed: Makefile
	test -x $(K8S_VENV)/bin/python || $(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install --quiet $(K8S_TOOLS)
	touch $@

$(VENV)/.installed: pyproject.toml client/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ./client -e '.[test]' $(TORCH_PINS)
	touch $@

test: venv k8s-tools
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -ra tests

# Unit tests only (no training, serving or sweeps).
test-fast: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -ra -m "not slow" tests

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) tools/demo.py $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(K8S_VENV) $(DEMO_DIR) .pytest_cache
