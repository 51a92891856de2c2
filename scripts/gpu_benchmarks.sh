#!/usr/bin/env bash
# The benchmarks docs/benchmarks.md lists for one GPU, in one command, for a machine lent for a few
# minutes: LLaVA-1.5-7B and LLaVA-1.6-7B shapes (random weights, float16), the compression variants
# and ToConv beside its peers. Results (JSON, markdown, PNG where matplotlib is installed) go to the
# folder given (default benchmarks/results), named as the docs name them.
#
#   bash scripts/gpu_benchmarks.sh [OUT_DIR]              # all four: 1 warm-up + 5 measured rounds each
#   REPEATS=10 bash scripts/gpu_benchmarks.sh [OUT_DIR]   # more rounds, longer
#
# Not yet run on a GPU (this project's sessions have had none); each step prints its wall time, so
# the first run tells how many rounds fit a lease.
# Needs torch with CUDA and transformers (>= 5.16.1) in `python3`; the repository is imported from
# the current directory, nothing is installed.
set -euo pipefail

cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'No CUDA device: these presets are for a GPU.')"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rounds=(--warmup 1 --repeats "${REPEATS:-5}")

bench() {
    local name=$1
    shift
    echo "[gpu] $name: python3 -m benchmarks.bench_compression $*" >&2
    local start=$SECONDS
    python3 -m benchmarks.bench_compression "$@" "${rounds[@]}" --json "$out/$name.json"
    echo "[gpu] $name done in $((SECONDS - start)) s" >&2
}

bench 7b-gpu --preset llava-1.5-7b
bench anyres-7b-gpu --preset llava-v1.6-vicuna-7b
bench peers-7b-gpu --compare-peers --preset llava-1.5-7b
bench peers-anyres-7b-gpu --compare-peers --preset llava-v1.6-vicuna-7b --image-sizes 1000x1000 --decode-tokens 32
