# Two commands matter: `make demo` (the main job end to end) and `make test` (the test suite).
# Both create ./.venv on first use. torch==2.13.0 is named in the same pip command as
# everything else so pip takes the local CPU wheel and never pulls CUDA packages.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: demo test test-slow test-all lint install data clean results-quick

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0 -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian (needs root); skipped when already there.
data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set MIPP_DATA"; exit 1; fi

# Train LeNet-5 on Fashion-MNIST, prune 90 % of its units with MIPP, fine-tune one epoch,
# and compare accuracy, parameters, MACs, latency and per-layer widths (--force: a second
# `make demo` replaces the previous demo's run directories).
demo: install data
	$(VENV)/bin/mipp train --model lenet5 --dataset fashion-mnist --epochs 3 \
		--latency-repeats 0 --out $(DEMO_OUT)/trained --force
	$(VENV)/bin/mipp prune $(DEMO_OUT)/trained/model.safetensors --sparsity 0.9 \
		--out $(DEMO_OUT)/pruned --force
	$(VENV)/bin/mipp finetune $(DEMO_OUT)/pruned/model.safetensors --epochs 1 \
		--out $(DEMO_OUT)/finetuned --force
	$(VENV)/bin/mipp compare $(DEMO_OUT)/trained/model.safetensors \
		$(DEMO_OUT)/pruned/model.safetensors $(DEMO_OUT)/finetuned/model.safetensors

# The committed quick-profile studies (results/<name>-quick/): measured 15 + 7 + 30 min on
# 2 CPU cores (the LeNet-5 sweep partly beside a test run).
QUICK_SWEEPS := lenet5_fmnist vgg11_fmnist resnet20_fmnist
results-quick: install data
	for c in $(QUICK_SWEEPS); do \
		$(VENV)/bin/mipp sweep experiments/$$c.toml --profile quick --report || exit 1; done

test: install
	$(PY) -m pytest

# Tests marked slow or needing the real Fashion-MNIST (CI runs these explicitly too), then
# the bad-input property suite with 400 random examples per property instead of 25.
test-slow: install data
	$(PY) -m pytest -m "slow or data" --durations=15
	HYPOTHESIS_PROFILE=slow $(PY) -m pytest tests/test_bad_inputs.py -q

test-all: test test-slow

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
