# Shared by the scripts/v1_5 launchers: defaults, compression flags, and the launch itself.
# shellcheck shell=bash

VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
COMPRESS_TO=${COMPRESS_TO:-}
REPORT_TO=${REPORT_TO:-none}

# DEVICE: gpu (LLaVA-1.5's recipe: DeepSpeed, FlashAttention-2, bf16, tf32) or cpu (a small run, e.g. on
# stand-ins: python llava/train/train.py, no DeepSpeed, float32, --use_cpu). Default: gpu when nvidia-smi
# lists a GPU, else cpu, said on stderr. LAUNCHER, ENTRY and DS_CONFIG still override either.
if [ -z "${DEVICE:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        DEVICE=gpu
    else
        DEVICE=cpu
        echo "No GPU found (nvidia-smi): training on the CPU (DEVICE=cpu: python llava/train/train.py, no DeepSpeed," \
             "--bf16 False --tf32 False --use_cpu True). Set DEVICE=gpu for LLaVA-1.5's GPU recipe." >&2
    fi
fi
case "$DEVICE" in
    gpu)
        LAUNCHER=${LAUNCHER:-deepspeed}
        ENTRY=${ENTRY:-llava/train/train_mem.py}
        PRECISION_ARGS=(--bf16 True --tf32 True)
        ;;
    cpu)
        LAUNCHER=${LAUNCHER:-python}
        ENTRY=${ENTRY:-llava/train/train.py}
        DS_CONFIG=${DS_CONFIG-}  # set (empty) here, so the stage scripts' DeepSpeed default does not apply
        PRECISION_ARGS=(--bf16 False --tf32 False --use_cpu True)
        ;;
    *)
        echo "DEVICE=$DEVICE is not a training device: use DEVICE=gpu (LLaVA-1.5's recipe) or DEVICE=cpu." >&2
        exit 2
        ;;
esac

# LLaVA-1.5's recipe, the same in every stage; the stage scripts add their own settings.
SHARED_TRAINING_ARGS=(
    --mm_projector_type mlp2x_gelu
    --mm_vision_select_layer -2
    --mm_use_im_start_end False
    --mm_use_im_patch_token False
    "${PRECISION_ARGS[@]}"
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
