#!/bin/bash
# LLaVA-Bench (in the wild): answers in $EVAL_DIR/llava-bench-in-the-wild/answers. Scoring them is a GPT-4
# review against answers_gpt4.jsonl (upstream's llava/eval/eval_gpt_review_bench.py, needs an OpenAI key).
source "$(dirname "$0")/common.sh"

answer model_vqa \
    --question-file "$EVAL_DIR/llava-bench-in-the-wild/questions.jsonl" \
    --image-folder "$EVAL_DIR/llava-bench-in-the-wild/images" \
    --answers-file "$EVAL_DIR/llava-bench-in-the-wild/answers/$TAG.jsonl"
