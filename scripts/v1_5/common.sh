# Shared by the scripts/v1_5 launchers: defaults, compression flags, and the launch itself.
# shellcheck shell=bash

VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
COMPRESS_TO=${COMPRESS_TO:-}
LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-llava/train/train_mem.py}
REPORT_TO=${REPORT_TO:-none}

# LLaVA-1.5's recipe, the same in every stage; the stage scripts add their own settings.
SHARED_TRAINING_ARGS=(
    --mm_projector_type mlp2x_gelu
    --mm_vision_select_layer -2
    --mm_use_im_start_end False
    --mm_use_im_patch_token False
    --bf16 True
    --num_train_epochs 1
    --per_device_eval_batch_size 4
    --gradient_accumulation_steps 1
    --eval_strategy no
    --save_strategy steps
    --save_total_limit 1
    --weight_decay 0.
    --warmup_steps 0.03
    --lr_scheduler_type cosine
    --logging_steps 1
    --tf32 True
    --model_max_length 2048
    --activation_checkpointing True
    --dataloader_num_workers 4
    --lazy_preprocess True
    --report_to "$REPORT_TO"
)

# "-toconv12" when compressing to 12×12, "" otherwise (goes into output folder names).
compress_tag() {
    if [ -n "$COMPRESS_TO" ]; then echo "-toconv${COMPRESS_TO}"; fi
}

# The compression flags; CLIP ViT-L/14-336 has a 24×24 patch grid.
compress_args() {
    if [ -n "$COMPRESS_TO" ]; then
        echo "--use_token_compression True --compression_input_size 24 --compression_output_size ${COMPRESS_TO}"
    fi
}

run_training() {
    local cmd=($LAUNCHER "$ENTRY")
    if [ -n "${DS_CONFIG:-}" ]; then
        cmd+=(--deepspeed "$DS_CONFIG")
    fi
    cmd+=("$@")
    if [ "${DRY_RUN:-0}" = "1" ]; then
        printf '%q ' "${cmd[@]}"
        echo
    else
        "${cmd[@]}"
    fi
}
