# sector: the Makefile is the entry point for users and for CI.
#   make demo    the whole SECToR loop on the micro config (under a minute)
#   make test    build from scratch and run every check CI runs
#   make bench   training and decoding throughput on this machine
# The paper's tables and figures arrive with their issue (README.md, "Status").

CARGO ?= cargo
SECTOR := target/release/sector
# Paper scale builds with `make build FEATURES=cuda`.
FEATURES ?=
FEATURE_FLAGS := $(if $(FEATURES),--features $(FEATURES),)

RUNS ?= runs

.PHONY: help build test lint bench bench-peer demo run

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

build:  ## release build of the sector binary
	$(CARGO) build --release $(FEATURE_FLAGS)

lint:  ## formatting and clippy, warnings are errors
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

test: lint  ## lint, then every unit and integration test (release mode: the tests train models)
	$(CARGO) test --release

demo: build  ## the SECToR loop end to end on experiments/micro.toml (machinery only: gates at 0)
	$(SECTOR) run experiments/micro.toml --runs-dir $(RUNS)

run: build  ## run (or resume) an experiment: make run CONFIG=experiments/NAME.toml
	$(SECTOR) run $(CONFIG) --runs-dir $(RUNS)

PEER_PYTHON := benches/.venv/bin/python
# The venv's python is a symlink to the system's, so its date says nothing
# about the install: a stamp file records that pip finished.
PEER_STAMP := benches/.venv/installed

bench-peer: $(PEER_STAMP)  ## the venv with torch + transformers for the peer benchmark (about 3 GB, 3 minutes)

$(PEER_STAMP): benches/requirements.txt
	python3 -m venv benches/.venv
	$(PEER_PYTHON) -m pip install --quiet -r benches/requirements.txt
	touch $@

bench: build bench-peer  ## sector vs PyTorch + transformers, interleaved per case (results/bench-cpu.md); about 20 minutes
	$(SECTOR) bench --peer "$(PEER_PYTHON) benches/peer.py" | tee results/bench-cpu.md
