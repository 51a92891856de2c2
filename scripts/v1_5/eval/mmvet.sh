#!/bin/bash
# MM-Vet: answers, then the results JSON for MM-Vet's GPT-4 grader ($EVAL_DIR/mm-vet/results).
source "$(dirname "$0")/common.sh"

answer model_vqa \
    --question-file "$EVAL_DIR/mm-vet/llava-mm-vet.jsonl" \
    --image-folder "$EVAL_DIR/mm-vet/images" \
    --answers-file "$EVAL_DIR/mm-vet/answers/$TAG.jsonl"

mkdir -p "$EVAL_DIR/mm-vet/results"
python -m llava.eval.convert_mmvet_for_eval \
    --src "$EVAL_DIR/mm-vet/answers/$TAG.jsonl" \
    --dst "$EVAL_DIR/mm-vet/results/$TAG.json"
