#!/bin/bash
# VQAv2 test-dev: answers (split over the GPUs), then the EvalAI upload file in $EVAL_DIR/vqav2/answers_upload.
# Data: $EVAL_DIR/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl, llava_vqav2_mscoco_test2015.jsonl, test2015/.
source "$(dirname "$0")/common.sh"
SPLIT="llava_vqav2_mscoco_test-dev2015"

answer_chunked "$EVAL_DIR/vqav2/answers/$SPLIT/$TAG" \
    --question-file "$EVAL_DIR/vqav2/$SPLIT.jsonl" \
    --image-folder "$EVAL_DIR/vqav2/test2015"

python -m llava.eval.convert_vqav2_for_submission --dir "$EVAL_DIR/vqav2" --split "$SPLIT" --ckpt "$TAG"
