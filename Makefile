# Everything runs inside a project-local virtual environment that the Makefile creates.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(PY) -m jobs
STAMP  := $(VENV)/.installed

# MNIST_SOURCE=DIR|URL on the command line (or in the environment) points fetch and bench at
# a local copy of MNIST instead of the public mirrors.

# LOG_FORMAT=json (on the command line or in the environment) makes every job log JSON lines,
# its error line included, for batch log collectors: `LOG_FORMAT=json make pipeline`.
ifneq ($(strip $(LOG_FORMAT)),)
export MNIST_PIPELINE_LOG_FORMAT := $(strip $(LOG_FORMAT))
endif

.PHONY: all pipeline install fetch ingest features train score bench bench-quick test lint clean

all: pipeline

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

## The whole pipeline, stage by stage (each stage skips work that is up to date).
pipeline: fetch ingest features train

fetch: $(STAMP)
	$(CLI) fetch

ingest: $(STAMP)
	$(CLI) ingest

features: $(STAMP)
	$(CLI) features

train: $(STAMP)
	$(CLI) train

# Scores the MNIST test split of the store with the model of the default run.
score: $(STAMP)
	$(CLI) score data/mnist.zarr --out data/predictions.parquet

bench: $(STAMP)
	$(CLI) bench

bench-quick: $(STAMP)
	$(CLI) bench --quick

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check pipeline jobs tests bench
	$(PY) -m ruff format --check pipeline jobs tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) data/raw data/*.zarr data/features data/models data/*.json data/*.parquet
