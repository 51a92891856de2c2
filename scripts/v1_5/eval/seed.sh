#!/bin/bash
# SEED-Bench (image and video-frame questions): answers (split over the GPUs), accuracy per question type,
# and the leaderboard upload file. Data: $EVAL_DIR/seed_bench/llava-seed-bench.jsonl, SEED-Bench.json, images.
source "$(dirname "$0")/common.sh"
ANSWERS="$EVAL_DIR/seed_bench/answers/$TAG"

answer_chunked "$ANSWERS" \
    --question-file "$EVAL_DIR/seed_bench/llava-seed-bench.jsonl" \
    --image-folder "$EVAL_DIR/seed_bench"

mkdir -p "$EVAL_DIR/seed_bench/answers_upload"
python -m llava.eval.convert_seed_for_submission \
    --annotation-file "$EVAL_DIR/seed_bench/SEED-Bench.json" \
    --result-file "$ANSWERS/merge.jsonl" \
    --result-upload-file "$EVAL_DIR/seed_bench/answers_upload/$TAG.jsonl"
