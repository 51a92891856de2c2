#!/bin/bash
# TextVQA val: answers, then VQA accuracy against TextVQA_0.5.1_val.json.
source "$(dirname "$0")/common.sh"

answer model_vqa_loader \
    --question-file "$EVAL_DIR/textvqa/llava_textvqa_val_v051_ocr.jsonl" \
    --image-folder "$EVAL_DIR/textvqa/train_images" \
    --answers-file "$EVAL_DIR/textvqa/answers/$TAG.jsonl"

python -m llava.eval.eval_textvqa \
    --annotation-file "$EVAL_DIR/textvqa/TextVQA_0.5.1_val.json" \
    --result-file "$EVAL_DIR/textvqa/answers/$TAG.jsonl"
