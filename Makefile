# `make demo` and `make test` each install what they need first, so either works as the first command typed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean gpu-check gpu-check-cpu

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(PY) run.py experiment=demo

test: install
	$(PY) -m pytest -q

# The GPU proof (benchmarks/gpu_check.py), one command for a short lease on one GPU: on the GPU machine, whose
# image has torch but no package index, hydra-core / omegaconf / antlr4 come as wheels from .whl/ (README: GPU).
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= gpu-check
GPU_SITE ?= /tmp/ssl_lab_site

gpu-check:
	@if ! $(GPU_PYTHON) -c "import hydra, omegaconf" 2>/dev/null; then \
		test -d .whl || { echo "gpu-check: hydra-core is missing and there is no .whl/ folder with its wheels"; exit 2; }; \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

# The same command at tiny sizes on the CPU (CI runs it through tests/test_gpu_check.py).
gpu-check-cpu: install
	$(PY) benchmarks/gpu_check.py --cpu --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) .cache runs multirun .pytest_cache
