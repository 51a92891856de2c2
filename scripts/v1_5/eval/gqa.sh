#!/bin/bash
# GQA testdev-balanced: answers (split over the GPUs), predictions for GQA's evaluator, accuracy.
# Data: $EVAL_DIR/gqa/llava_gqa_testdev_balanced.jsonl, $EVAL_DIR/gqa/data/images, and GQA's
# testdev_balanced_questions.json in $EVAL_DIR/gqa/data (GQA's official eval/eval.py there runs too).
source "$(dirname "$0")/common.sh"
SPLIT="llava_gqa_testdev_balanced"
GQADIR="$EVAL_DIR/gqa/data"
ANSWERS="$EVAL_DIR/gqa/answers/$SPLIT/$TAG"

answer_chunked "$ANSWERS" \
    --question-file "$EVAL_DIR/gqa/$SPLIT.jsonl" \
    --image-folder "$EVAL_DIR/gqa/data/images"

python -m llava.eval.convert_gqa_for_eval --src "$ANSWERS/merge.jsonl" --dst "$GQADIR/testdev_balanced_predictions.json"

cd "$GQADIR"
python -m llava.eval.eval_gqa --tier testdev_balanced
if [ -f eval/eval.py ]; then
    python eval/eval.py --tier testdev_balanced
fi
