#!/bin/bash
# VizWiz test: answers, then the EvalAI upload file in $EVAL_DIR/vizwiz/answers_upload.
source "$(dirname "$0")/common.sh"

answer model_vqa_loader \
    --question-file "$EVAL_DIR/vizwiz/llava_test.jsonl" \
    --image-folder "$EVAL_DIR/vizwiz/test" \
    --answers-file "$EVAL_DIR/vizwiz/answers/$TAG.jsonl"

python -m llava.eval.convert_vizwiz_for_submission \
    --annotation-file "$EVAL_DIR/vizwiz/llava_test.jsonl" \
    --result-file "$EVAL_DIR/vizwiz/answers/$TAG.jsonl" \
    --result-upload-file "$EVAL_DIR/vizwiz/answers_upload/$TAG.json"
