# The two commands a new machine needs (README): `make demo` (the main job) and `make test`.
# Both set up first. torch is installed only when absent (pip install torch==2.13.0 takes the
# local CPU wheel here), so an installed torch is never replaced.
PYTHON ?= python3

.PHONY: setup demo test lint

# Where nvcc exists (no GPU needed), CUTLASS's headers let the tests compile the SM90 kernels' device
# code and check ptxas's report. --no-deps: only the headers are used. Without them that test skips.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"
	command -v nvcc >/dev/null && $(PYTHON) -m pip install -q --no-deps --retries 1 --timeout 30 nvidia-cutlass==4.2.0.0 || true

demo: setup
	$(PYTHON) -m flexattn_ops.demo

lint: setup
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

test: lint
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=15 tests
