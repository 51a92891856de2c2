#!/bin/bash
# MMBench dev (English): answers, the upload sheet for MMBench's server, and the dev-split accuracy.
source "$(dirname "$0")/common.sh"
SPLIT=${SPLIT:-mmbench_dev_20230712}
BENCH=${BENCH:-mmbench}
LANG_ARGS=()
if [ "$BENCH" = "mmbench_cn" ]; then LANG_ARGS=(--lang cn); fi

answer model_vqa_mmbench \
    --question-file "$EVAL_DIR/$BENCH/$SPLIT.tsv" \
    --answers-file "$EVAL_DIR/$BENCH/answers/$SPLIT/$TAG.jsonl" \
    "${LANG_ARGS[@]}" \
    --single-pred-prompt

mkdir -p "$EVAL_DIR/$BENCH/answers_upload/$SPLIT"
python -m llava.eval.convert_mmbench_for_submission \
    --annotation-file "$EVAL_DIR/$BENCH/$SPLIT.tsv" \
    --result-dir "$EVAL_DIR/$BENCH/answers/$SPLIT" \
    --upload-dir "$EVAL_DIR/$BENCH/answers_upload/$SPLIT" \
    --experiment "$TAG"

python -m llava.eval.eval_mmbench \
    --annotation-file "$EVAL_DIR/$BENCH/$SPLIT.tsv" \
    --result-file "$EVAL_DIR/$BENCH/answers/$SPLIT/$TAG.jsonl"
