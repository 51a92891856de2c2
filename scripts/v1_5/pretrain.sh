#!/bin/bash
# LLaVA-1.5 stage 1: train the projector (and the ToConv token compressor, when COMPRESS_TO is set)
# on image-caption pairs. Writes $OUTPUT_DIR/mm_projector.bin (projector + compressor weights).
#
# Settings come from the environment; any extra arguments are passed on to llava/train/train_mem.py:
#   LLM             language model to start from            (lmsys/vicuna-13b-v1.5)
#   VISION_TOWER    CLIP tower                              (openai/clip-vit-large-patch14-336)
#   DATA_PATH       caption conversations (plain template)  (./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json)
#   IMAGE_FOLDER    images of DATA_PATH                     (./playground/data/LLaVA-Pretrain/images)
#   COMPRESS_TO     compressed grid side: 12 (144 tokens) or 8 (64); unset: no compression
#   OUTPUT_DIR      (./checkpoints/llava-v1.5-13b[-toconv$COMPRESS_TO]-pretrain)
#   DEVICE          gpu or cpu (gpu when nvidia-smi lists one); cpu: the launcher, entry, DeepSpeed and
#                   precision defaults below become python, llava/train/train.py, none, float32 + --use_cpu
#   LAUNCHER        (deepspeed); e.g. "torchrun --nproc_per_node 8"
#   ENTRY           (llava/train/train_mem.py: FlashAttention-2); llava/train/train.py without flash-attn
#   DS_CONFIG       (./scripts/zero2.json); empty: no DeepSpeed (plain DDP under torchrun)
#   DRY_RUN=1       print the command instead of running it
# Sized for 8 GPUs × 32 images (global batch 256), as LLaVA-1.5; keep the global batch when
# changing the GPU count (per_device_train_batch_size × GPUs × gradient_accumulation_steps).
set -euo pipefail
source "$(dirname "$0")/common.sh"

LLM=${LLM:-lmsys/vicuna-13b-v1.5}
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
DS_CONFIG=${DS_CONFIG-./scripts/zero2.json}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-13b$(compress_tag)-pretrain}

run_training \
    --model_name_or_path "$LLM" \
    --version plain \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --tune_mm_mlp_adapter True \
    $(compress_args) \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size 32 \
    --save_steps 24000 \
    --learning_rate 1e-3 \
    "${SHARED_TRAINING_ARGS[@]}" \
    "$@"
