#!/bin/bash
# ScienceQA-IMG test: answers with the single-letter prompt, then accuracy.
# Data: $EVAL_DIR/scienceqa/llava_test_CQM-A.json, problems.json, pid_splits.json, images/test.
source "$(dirname "$0")/common.sh"

answer model_vqa_science \
    --question-file "$EVAL_DIR/scienceqa/llava_test_CQM-A.json" \
    --image-folder "$EVAL_DIR/scienceqa/images/test" \
    --answers-file "$EVAL_DIR/scienceqa/answers/$TAG.jsonl" \
    --single-pred-prompt

python -m llava.eval.eval_science_qa \
    --base-dir "$EVAL_DIR/scienceqa" \
    --result-file "$EVAL_DIR/scienceqa/answers/$TAG.jsonl" \
    --output-file "$EVAL_DIR/scienceqa/answers/${TAG}_output.jsonl" \
    --output-result "$EVAL_DIR/scienceqa/answers/${TAG}_result.json"
