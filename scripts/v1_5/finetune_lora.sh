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
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    $(compress_args) \
    "${FREEZE[@]}" \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-4 \
    --weight_decay 0. \
    --warmup_steps 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --activation_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    "$@"
