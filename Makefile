# sector: the Makefile is the entry point for users and for CI.
#   make demo            the whole SECToR loop on the micro config (half a minute)
#   make test            build from scratch and run every check CI runs
#   make table1 ... all  the paper's artifacts (SCALE=micro|cpu|paper), see `make help`
#   make verify          recompute the hashes of the recorded results (and of runs/)
#   make bench           training and decoding throughput on this machine
#   make check-cuda      compile the paper-scale CUDA and NCCL builds (no GPU needed)
#   make smoke-paper     byt5-small and byt5-base trained, decoded, saved and reloaded on the CPU

CARGO ?= cargo
SECTOR := target/release/sector
# Paper scale builds with `make build FEATURES=cuda`.
FEATURES ?=
FEATURE_FLAGS := $(if $(FEATURES),--features $(FEATURES),)

RUNS ?= runs
# Data-parallel over this many GPUs (paper scale, a build with FEATURES=nccl).
GPUS ?= 1
# Data-parallel over this many CPU cores, ranks as threads of one process at
# one thread each: `make main CPU_RANKS=2` (the files of one rank when every
# batch is cut into that many micro-batches: train.micro_batches).
CPU_RANKS ?= 1
RANK_FLAGS := --gpus $(GPUS) --cpu-ranks $(CPU_RANKS)

# Which scale the artifact targets use: micro (machinery check, minutes),
# cpu (this machine's reference results) or paper (CUDA; DEVICE=cuda).
SCALE ?= cpu
DEVICE ?= $(if $(filter paper,$(SCALE)),cuda,cpu)
RESULTS := results/$(SCALE)
# CPU-scale runs take one thread each: the narrow reference model trains only
# 10 % faster on two cores than on one, and two runs side by side (make -j2)
# get 80 % more done. (Checkpoints have the same bits at any thread count.)
THREADS_cpu := 1
RUN_ENV := $(if $(THREADS_$(SCALE)),RAYON_NUM_THREADS=$(THREADS_$(SCALE)))

.PHONY: help build test lint bench bench-peer compare-transformers demo main run all verify check-cuda cost smoke-paper

help:  ## list the targets (an artifact renders in under a second; the times are of its experiment, run only if unrecorded: micro and cpu measured here, paper the floor `make cost` estimates)
	@grep -E '^[a-z0-9 -]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 22

build:  ## release build of the sector binary
	$(CARGO) build --release $(FEATURE_FLAGS)

lint:  ## formatting and clippy, warnings are errors
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

test: lint  ## lint, then every unit and integration test (release mode: the tests train models)
	$(CARGO) test --release

cost: build  ## FLOPs and GPU hours of the paper-scale experiments (REPRODUCE.md's cost table; a second)
	$(SECTOR) cost $(filter-out experiments/paper/table2.toml,$(wildcard experiments/paper/*.toml))

check-cuda:  ## compile the CUDA and NCCL builds here (installs CUDA 11.8 and NCCL; about 25 minutes cold; runs nothing on a GPU)
	.ci/check-cuda

smoke-paper: build  ## byt5-small and byt5-base from random weights on the CPU: 3 steps of the paper's first stage at batch 8, decoding, a checkpoint saved and reloaded (11 minutes at one thread, 19 GiB of memory)
	$(SECTOR) smoke experiments/paper/main.toml --out $(RUNS)/smoke

demo: build  ## the SECToR loop end to end on experiments/micro/main.toml (machinery only: gates at 0)
	$(SECTOR) run experiments/micro/main.toml --runs-dir $(RUNS)

main: build  ## the main job: rerun the reference experiment of SCALE (cpu: 7.6 h of stage time at one thread, measured for the recording; resumable) into runs/, then check it against the recorded run
	$(RUN_ENV) $(SECTOR) run experiments/$(SCALE)/main.toml --runs-dir $(RUNS) --device $(DEVICE) $(RANK_FLAGS)
	$(SECTOR) verify $(RUNS)/$(SCALE)-main --against $(RESULTS)/main/run-manifest.sha256 || \
	  (echo "The rerun differs from the recording: see the lines above (REPRODUCE.md, 'Hashes and sector verify')."; exit 1)

run: build  ## run (or resume) an experiment: make run CONFIG=experiments/NAME.toml [GPUS=8 FEATURES=nccl, or CPU_RANKS=2]
	$(SECTOR) run $(CONFIG) --runs-dir $(RUNS) $(RANK_FLAGS)

PEER_PYTHON := benches/.venv/bin/python
# The venv's python is a symlink to the system's, so its date says nothing
# about the install: a stamp file records that pip finished.
PEER_STAMP := benches/.venv/installed

bench-peer: $(PEER_STAMP)  ## the venv with torch + transformers for the peer benchmark (about 3 GB, 3 minutes)

$(PEER_STAMP): benches/requirements.txt
	python3 -m venv benches/.venv
	$(PEER_PYTHON) -m pip install --quiet -r benches/requirements.txt
	touch $@

compare-transformers: bench-peer  ## sector against transformers on a random byt5-small it saved (encoder output, logits, greedy outputs; REPRODUCE.md); 2.4 GB in runs/, about 5 minutes
	$(PEER_PYTHON) tests/fixtures/make_t5_fixture.py --shape byt5-small $(RUNS)/byt5-small-golden
	SECTOR_GOLDEN_DIR=$(RUNS)/byt5-small-golden $(CARGO) test --release --test golden -- --nocapture --test-threads 1

bench: build bench-peer  ## sector vs PyTorch + transformers, interleaved per case (results/bench-cpu.md); about 20 minutes
	$(SECTOR) bench --peer "$(PEER_PYTHON) benches/peer.py" | tee results/bench-cpu.md

# --- The paper's artifacts -------------------------------------------------
# A table or figure renders from the recorded CSVs under results/$(SCALE)/
# (seconds); the experiment behind it runs (or resumes) only when its
# recorded results are missing. The times in `make help` are those of the
# experiments (REPRODUCE.md, "The artifacts", says how each was measured).

ARTIFACTS := table1 table2 table3 fig3 fig4 fig5 fig6 fig7 fig8 fig9 fig10 fig11 \
	ablation-curriculum emergence control ablation-self
.PHONY: $(ARTIFACTS)

table1 fig3 fig4 fig5 fig6 fig9 fig10: $(RESULTS)/main/manifest.sha256
table3 fig7 fig8 fig11: $(RESULTS)/second/manifest.sha256
table2: $(RESULTS)/table2/manifest.sha256
ablation-curriculum: $(RESULTS)/main/manifest.sha256 $(RESULTS)/ablation-curriculum/manifest.sha256
emergence: $(RESULTS)/emergence-1/manifest.sha256 $(RESULTS)/emergence-2/manifest.sha256 $(RESULTS)/emergence-3/manifest.sha256
control: $(RESULTS)/control/manifest.sha256
# The self-training ablations; the paper's check alone only where the main
# run uses stronger ones (a config for it exists at that scale).
SELF_ABLATIONS := $(patsubst experiments/$(SCALE)/%.toml,$(RESULTS)/%/manifest.sha256,\
	$(wildcard $(foreach v,no-commutativity fast-labels simplify-only commutativity-only,experiments/$(SCALE)/ablation-$(v).toml)))
ablation-self: $(RESULTS)/main/manifest.sha256 $(SELF_ABLATIONS)

table1:  ## final checkpoint, fast accuracy by length (main: micro 8 s, cpu 55 min, paper >= 5.8 h on 8 V100)
table2:  ## models out of the box, 10-shot (micro 0.1 s, cpu 8 min; paper not estimated)
table3:  ## second run final checkpoint (second: micro 7 s, cpu 35 min, paper >= 3.0 h on 8 V100)
fig3:  ## N+1 generalisation, fast vs slow (main run)
fig4:  ## simplify-then-guess traced (main run)
fig5:  ## error rate of generated data by method (main run)
fig6:  ## accuracy by stage and length, fast and chain (main run)
fig7:  ## second run, fast
fig8:  ## second run, chain of thought
fig9:  ## accuracy against carries (main run)
fig10:  ## examples generated and consumed (main run)
fig11:  ## examples generated and consumed (second run)
ablation-curriculum:  ## one supervised stage vs the curriculum (micro 7 s, cpu 34 min, paper >= 0.1 h; + main)
emergence:  ## supervised length needed per model size (micro 44 s, cpu 105 min, paper >= 4.6 h on 8 V100)
control:  ## supervised 1..5 then self-training (micro 8 s, cpu 30 min, paper >= 2.9 h on 8 V100)
ablation-self:  ## self-training without its checks or simplify-then-guess, audited error per stage (+ main)

$(ARTIFACTS): | build
	$(SECTOR) render $@ --scale $(SCALE)

all: $(ARTIFACTS)  ## every table and figure (rendering recorded results: micro 0.6 s, cpu 0.3 s; micro from nothing: 70 s)

# Run (or resume) an experiment and record its results. Order-only on the
# binary: a rebuild does not make recorded results stale.
$(RESULTS)/table2/manifest.sha256: | build
	$(RUN_ENV) $(SECTOR) fewshot experiments/$(SCALE)/table2.toml --runs-dir $(RUNS) --device $(DEVICE) --record $(RESULTS)/table2

# Pretraining (micro and CPU scale: src/pretrain.rs) comes first for the
# runs whose config names one (model.pretrain), so that it is recorded too;
# a run would also make it itself. Runs from random weights do not wait.
PRETRAINED := $(patsubst experiments/$(SCALE)/%.toml,$(RESULTS)/%/manifest.sha256,\
	$(wildcard experiments/$(SCALE)/pretrain*.toml))
FROM_PRETRAINED := $(patsubst experiments/$(SCALE)/%.toml,$(RESULTS)/%/manifest.sha256,\
	$(shell grep -l '^pretrain *=' experiments/$(SCALE)/*.toml 2>/dev/null))

$(PRETRAINED): $(RESULTS)/%/manifest.sha256: | build
	$(RUN_ENV) $(SECTOR) pretrain experiments/$(SCALE)/$*.toml --runs-dir $(RUNS) --device $(DEVICE) --record $(RESULTS)/$*

$(FROM_PRETRAINED): | $(PRETRAINED)

# An ablation takes over the main run's supervised phase from its run
# directory (supervised.from), so the main run is made (or found) there first.
$(SELF_ABLATIONS): $(RESULTS)/%/manifest.sha256: | build
	$(RUN_ENV) $(SECTOR) run experiments/$(SCALE)/main.toml --runs-dir $(RUNS) --device $(DEVICE) $(RANK_FLAGS)
	$(RUN_ENV) $(SECTOR) run experiments/$(SCALE)/$*.toml --runs-dir $(RUNS) --device $(DEVICE) $(RANK_FLAGS) --record $(RESULTS)/$*

$(RESULTS)/%/manifest.sha256: | build
	$(RUN_ENV) $(SECTOR) run experiments/$(SCALE)/$*.toml --runs-dir $(RUNS) --device $(DEVICE) $(RANK_FLAGS) --record $(RESULTS)/$*

verify: build  ## recompute every recorded hash; reruns in runs/ are checked against the recorded run manifests
	$(SECTOR) verify $(dir $(wildcard results/*/*/manifest.sha256))
	@for recorded in results/*/*/run-manifest.sha256; do \
	  scale=$$(basename $$(dirname $$(dirname $$recorded))); exp=$$(basename $$(dirname $$recorded)); \
	  run=$(RUNS)/$$scale-$$exp; \
	  if [ -d $$run ]; then echo "rerun $$run against $$recorded"; \
	    $(SECTOR) verify $$run --against $$recorded || exit 1; fi; \
	done
