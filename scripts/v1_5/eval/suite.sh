#!/bin/bash
# Every benchmark × every compression level, then one table: $EVAL_DIR/suite/$CKPT/summary.{json,md,png}.
# Environment: that of the other eval scripts (common.sh: MODEL_PATH, MODEL_BASE, CKPT, EVAL_DIR, DEVICE,
# EVAL_ARGS, CONV_MODE, TOKEN_COMPRESSOR, CUDA_VISIBLE_DEVICES), plus
#   BENCHMARKS  script names to run, e.g. "textvqa pope mme" (default: every benchmark whose data is
#               under EVAL_DIR; the others are listed as skipped with the missing path)
#   LEVELS      compression levels (default "none 12 8": 576, 144 and 64 image tokens for a 24×24 tower)
# Each run resumes (RESUME=1): complete answers are not generated again. Exit status 0 when every
# benchmark × level succeeded, 1 when one failed (the others still run), 2 on bad input. docs/evaluation.md.
set -euo pipefail
exec python -m llava.eval.suite "$(dirname "$0")"
