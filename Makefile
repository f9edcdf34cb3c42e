# The dev environment pins PyTorch 2.13.0 (CPU build); pyproject.toml accepts a range for users.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
# DeepSpeed publishes only a source distribution. With DS_BUILD_OPS=0 (Linux's default, set so that an inherited
# DS_BUILD_OPS=1 cannot start a CUDA build) pip builds it without compiling any op: 12-20 s on 2 cores, no pip cache.
DEEPSPEED_PIN := deepspeed==0.19.8

.PHONY: test demo bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,demo]' $(TORCH_PIN)
	touch $@

# Its own stamp, and never fatal: where DeepSpeed cannot be installed, tests/test_integration_deepspeed.py is skipped
# (pytest -ra names the reason) and the next make test tries again.
$(VENV)/.deepspeed: $(VENV)/.installed
	DS_BUILD_OPS=0 $(PY) -m pip install -q $(DEEPSPEED_PIN) $(TORCH_PIN) && touch $@ \
		|| echo "WARNING: $(DEEPSPEED_PIN) could not be installed; the DeepSpeed integration tests will be skipped"

venv: $(VENV)/.installed $(VENV)/.deepspeed

test: venv
	$(PY) -m pytest -q -ra

demo: venv
	$(VENV)/bin/zeroadam demo

bench: venv
	$(PY) -m pip install -q '.[bench]' $(TORCH_PIN) || echo "some benchmark competitors could not be installed; their rows are marked missing"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
