# The dev environment pins PyTorch 2.13.0 (CPU build); pyproject.toml accepts a range for users.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: test demo bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,demo]' $(TORCH_PIN)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -ra

demo: venv
	$(VENV)/bin/zeroadam demo

bench: venv
	$(PY) -m pip install -q '.[bench]' $(TORCH_PIN) || echo "some benchmark competitors could not be installed; their rows are marked missing"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
