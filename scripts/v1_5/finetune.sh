#!/bin/bash
# LLaVA-1.5 stage 2: fine-tune the LLM, projector and token compressor on instruction data,
# starting from stage 1's mm_projector.bin (which restores the projector and the compressor).
#
# Settings (environment; extra arguments go on to the trainer):
#   LLM, VISION_TOWER, COMPRESS_TO, DEVICE, LAUNCHER, ENTRY, DRY_RUN   as in pretrain.sh
#   PROJECTOR      stage 1's mm_projector.bin   (./checkpoints/llava-v1.5-13b[-toconv$COMPRESS_TO]-pretrain/mm_projector.bin)
#   DATA_PATH      (./playground/data/llava_v1_5_mix665k.json)
#   IMAGE_FOLDER   (./playground/data)
#   DS_CONFIG      (./scripts/zero3.json)
#   OUTPUT_DIR     (./checkpoints/llava-v1.5-13b[-toconv$COMPRESS_TO])
#   FREEZE_COMPRESSOR=1   keep the compressor as stage 1 left it
# Sized for 8 GPUs × 16 (global batch 128), as LLaVA-1.5.
set -euo pipefail
source "$(dirname "$0")/common.sh"

LLM=${LLM:-lmsys/vicuna-13b-v1.5}
PROJECTOR=${PROJECTOR:-./checkpoints/llava-v1.5-13b$(compress_tag)-pretrain/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
DS_CONFIG=${DS_CONFIG-./scripts/zero3.json}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-13b$(compress_tag)}
FREEZE=()
if [ "${FREEZE_COMPRESSOR:-0}" = "1" ]; then FREEZE=(--freeze_token_compressor True); fi

run_training \
    --model_name_or_path "$LLM" \
    --version v1 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --pretrain_mm_mlp_adapter "$PROJECTOR" \
    $(compress_args) \
    "${FREEZE[@]}" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size 16 \
    --save_steps 50000 \
    --learning_rate 2e-5 \
    "${SHARED_TRAINING_ARGS[@]}" \
    "$@"
