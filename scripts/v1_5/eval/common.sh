# Shared by the scripts/v1_5/eval launchers: the checkpoint, the compression setting, where answers go.
# shellcheck shell=bash
#
# Environment (defaults are upstream's):
#   MODEL_PATH        checkpoint to evaluate (liuhaotian/llava-v1.5-13b)
#   MODEL_BASE        base LLM for projector-only or LoRA checkpoints (none)
#   CKPT              name of its answers (the last part of MODEL_PATH)
#   COMPRESS_TO       12 or 8: switch ToConv compression on (144 or 64 image tokens); unset: off
#   TOKEN_COMPRESSOR  compressor checkpoint (.safetensors) for COMPRESS_TO; default: the window average
#   CONV_MODE         conversation template (vicuna_v1)
#   DEVICE            cuda, cpu, ... (default: cuda when available)
#   EVAL_DIR          benchmark data root (./playground/data/eval)
#   EVAL_ARGS         extra flags for the answering module, e.g. "--batch-size 8"
#   RESUME            1: keep the answers already written (matching the questions, in order) and answer
#                     only the rest (--resume); complete answers load no model. Unset: answer afresh.
# Answers are written under "$TAG": CKPT, plus "-toconv12" / "-toconv8" with compression, so runs with
# and without compression sit side by side. Beside each answers file X.jsonl, X.image_tokens.jsonl holds
# the image tokens the language model received for each answer.
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-liuhaotian/llava-v1.5-13b}
MODEL_BASE=${MODEL_BASE:-}
CKPT=${CKPT:-$(basename "$MODEL_PATH")}
COMPRESS_TO=${COMPRESS_TO:-}
TOKEN_COMPRESSOR=${TOKEN_COMPRESSOR:-}
CONV_MODE=${CONV_MODE:-vicuna_v1}
DEVICE=${DEVICE:-}
EVAL_DIR=${EVAL_DIR:-./playground/data/eval}
RESUME=${RESUME:-}
read -r -a EXTRA_ARGS <<< "${EVAL_ARGS:-}"

if [ -n "$TOKEN_COMPRESSOR" ] && [ -z "$COMPRESS_TO" ]; then
    echo "TOKEN_COMPRESSOR=$TOKEN_COMPRESSOR is set but COMPRESS_TO is not: set COMPRESS_TO=12 or 8 to use it." >&2
    exit 2
fi
TAG="${CKPT}${COMPRESS_TO:+-toconv${COMPRESS_TO}}"

# Flags every answering module takes: model, greedy decoding, template, compression, device.
MODEL_ARGS=(--model-path "$MODEL_PATH" --temperature 0 --conv-mode "$CONV_MODE")
if [ -n "$MODEL_BASE" ]; then MODEL_ARGS+=(--model-base "$MODEL_BASE"); fi
if [ -n "$COMPRESS_TO" ]; then MODEL_ARGS+=(--use-token-compression --compression-output-size "$COMPRESS_TO"); fi
if [ -n "$TOKEN_COMPRESSOR" ]; then MODEL_ARGS+=(--token-compressor-path "$TOKEN_COMPRESSOR"); fi
if [ -n "$DEVICE" ]; then MODEL_ARGS+=(--device "$DEVICE"); fi
if [ -n "$RESUME" ]; then MODEL_ARGS+=(--resume); fi
MODEL_ARGS+=("${EXTRA_ARGS[@]}")

# answer MODULE ARGS...: one answering run of a llava.eval module.
answer() {
    local module=$1
    shift
    python -m "llava.eval.$module" "${MODEL_ARGS[@]}" "$@"
}

# answer_chunked OUT_DIR ARGS...: model_vqa_loader split over the GPUs in CUDA_VISIBLE_DEVICES (one chunk
# each, one chunk on a CPU), then the chunks merged in order into OUT_DIR/merge.jsonl (and their image-token
# sidecars into merge.image_tokens.jsonl). If a chunk fails, the script stops once every chunk has ended
# (none is left running), and there is no merge.jsonl.
answer_chunked() {
    local out_dir=$1
    shift
    local gpus
    IFS=',' read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-0}"
    local chunks=${#gpus[@]} pids=() failed=() idx
    mkdir -p "$out_dir"
    rm -f "$out_dir/merge.jsonl" "$out_dir/merge.image_tokens.jsonl"
    for idx in $(seq 0 $((chunks - 1))); do
        CUDA_VISIBLE_DEVICES=${gpus[$idx]} answer model_vqa_loader "$@" \
            --answers-file "$out_dir/${chunks}_${idx}.jsonl" --num-chunks "$chunks" --chunk-idx "$idx" &
        pids+=($!)
    done
    for idx in "${!pids[@]}"; do
        wait "${pids[$idx]}" || failed+=("$idx")
    done
    if [ "${#failed[@]}" -gt 0 ]; then
        echo "chunk(s) ${failed[*]} of $chunks failed; no $out_dir/merge.jsonl written." >&2
        exit 1
    fi
    : > "$out_dir/merge.jsonl"
    : > "$out_dir/merge.image_tokens.jsonl"
    for idx in $(seq 0 $((chunks - 1))); do
        cat "$out_dir/${chunks}_${idx}.jsonl" >> "$out_dir/merge.jsonl"
        cat "$out_dir/${chunks}_${idx}.image_tokens.jsonl" >> "$out_dir/merge.image_tokens.jsonl"
    done
}
