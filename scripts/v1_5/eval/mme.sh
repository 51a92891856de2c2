#!/bin/bash
# MME: answers, MME's per-subtask answer files, then the perception and cognition scores.
# Data: $EVAL_DIR/MME/llava_mme.jsonl and MME_Benchmark_release_version/.
source "$(dirname "$0")/common.sh"

answer model_vqa_loader \
    --question-file "$EVAL_DIR/MME/llava_mme.jsonl" \
    --image-folder "$EVAL_DIR/MME/MME_Benchmark_release_version" \
    --answers-file "$EVAL_DIR/MME/answers/$TAG.jsonl"

cd "$EVAL_DIR/MME"
python -m llava.eval.convert_answer_to_mme --experiment "$TAG"

cd eval_tool
python -m llava.eval.eval_mme --results_dir "answers/$TAG"
