#!/bin/bash
# POPE (adversarial, popular, random): answers, then accuracy, precision, recall, F1 and yes-ratio per split.
source "$(dirname "$0")/common.sh"

answer model_vqa_loader \
    --question-file "$EVAL_DIR/pope/llava_pope_test.jsonl" \
    --image-folder "$EVAL_DIR/pope/val2014" \
    --answers-file "$EVAL_DIR/pope/answers/$TAG.jsonl"

python -m llava.eval.eval_pope \
    --annotation-dir "$EVAL_DIR/pope/coco" \
    --question-file "$EVAL_DIR/pope/llava_pope_test.jsonl" \
    --result-file "$EVAL_DIR/pope/answers/$TAG.jsonl"
