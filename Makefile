# chimein — `make run` does the main job on the embedded default, `make test` runs the tests.
# Both set everything up on a fresh machine: a virtualenv in .venv, the package, offline assets.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chimein-installed
# torch first, pinned: the CPU build lies on local disk here; a bare `torch` would pull CUDA (GBs)
TORCH ?= torch==2.13.0

.PHONY: setup assets run test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(BIN)/chimein assets

# the main job on the embedded default: offline generation → versioned dataset → training rows
# → QLoRA training tracked in ./mlflow.db (conf/train/offline-cpu.yaml: 12 steps of batch 4 x 2,
# ~45 s each on 2 CPU cores). Reruns resume, or find the run finished.
run: assets
	$(BIN)/chimein generate --source offline --count 200 --out outputs/conversations.jsonl --resume
	$(BIN)/chimein dataset build --data outputs/conversations.jsonl --publish local
	$(BIN)/chimein preprocess --model smollm2-135m-instruct --data outputs/conversations.jsonl \
		--out outputs/preprocessed
	$(BIN)/chimein train --config conf/train/offline-cpu.yaml --dataset outputs/conversations.jsonl \
		--resume

test: assets
	$(BIN)/python -m pytest -q

clean:
	rm -rf outputs store mlflow.db mlruns .pytest_cache
