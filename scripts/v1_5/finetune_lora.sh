#!/bin/bash
# LLaVA-1.5 stage 2 with LoRA: LoRA adapters on the LLM; the projector and token compressor train
# in full (at mm_projector_lr) and are saved to non_lora_trainables.bin beside the adapters.
# load_pretrained_model(OUTPUT_DIR, model_base=LLM) merges both back.
#
# Settings as finetune.sh; OUTPUT_DIR defaults to ./checkpoints/llava-v1.5-13b[-toconv$COMPRESS_TO]-lora
# (keep "llava" and "lora" in the name: load_pretrained_model recognises LoRA checkpoints by it).
set -euo pipefail
source "$(dirname "$0")/common.sh"

LLM=${LLM:-lmsys/vicuna-13b-v1.5}
PROJECTOR=${PROJECTOR:-./checkpoints/llava-v1.5-13b$(compress_tag)-pretrain/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
DS_CONFIG=${DS_CONFIG-./scripts/zero3.json}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-13b$(compress_tag)-lora}
FREEZE=()
if [ "${FREEZE_COMPRESSOR:-0}" = "1" ]; then FREEZE=(--freeze_token_compressor True); fi

run_training \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
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
    --learning_rate 2e-4 \
    "${SHARED_TRAINING_ARGS[@]}" \
    "$@"
