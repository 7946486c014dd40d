# One command for the main job, one for the tests; both set everything up on a fresh machine.
#   make main    # a small real routed training run (quick MNIST recipe, routed + control), prints results
#   make test    # the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
# CPU torch is installed first, pinned: a bare `torch` requirement would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup main test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml experiments/pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,experiments]" -e ./experiments
	touch $@

setup: $(VENV)/.installed

main: setup
	$(BIN)/gradroute fit --config recipes/mnist/split.yaml
	$(BIN)/gradroute fit --config recipes/mnist/control.yaml
	@echo "figures (mnist_per_digit_error.png, mnist_reconstructions.png) and results.json:"
	@ls -d runs/mnist/split/version_* runs/mnist/control/version_* | sed 's/^/  /'
	@echo "TensorBoard: $(BIN)/tensorboard --logdir runs/mnist"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
