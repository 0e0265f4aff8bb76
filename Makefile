# chimein — `make run` does the main job on the embedded default, `make test` runs the tests.
# Both set everything up on a fresh machine: a virtualenv in .venv, the package, offline assets.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chimein-installed
# torch first, pinned: the CPU build lies on local disk here; a bare `torch` would pull CUDA (GBs)
TORCH ?= torch==2.13.0

.PHONY: setup assets browser run test docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(BIN)/chimein assets

# the main job on the embedded default: the retrain flow (Prefect without a server) — offline
# generation → versioned dataset → LoRA training of SmolLM2 on the CPU (conf/train/offline-cpu.yaml,
# ~6 min, its layers compiled first) with a calibrated threshold → the shipped benchmark (decides
# promotion), the held-out split and the grounded chats → adapter → MLflow (./mlflow.db) and its
# champion. ~9.5 min on 2 idle cores of an Intel Xeon (README: how long `make run` takes).
run: assets
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python flows/retrain.py

# the browser tests drive Debian's Chromium, headless, and its chromedriver (about 20 s to install)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# the tests, then the docs site (broken links and stale config references fail it)
test: assets browser
	$(BIN)/python -m pytest -q
	$(MAKE) docs

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# store/ also holds the Prefect task cache (store/prefect-cache): it goes with the data it names
clean:
	rm -rf outputs store mlflow.db mlruns .pytest_cache site
