# Shared by the scripts/v1_5 launchers: defaults, compression flags, and the launch itself.
# shellcheck shell=bash

VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
COMPRESS_TO=${COMPRESS_TO:-}
LAUNCHER=${LAUNCHER:-deepspeed}
ENTRY=${ENTRY:-llava/train/train_mem.py}
REPORT_TO=${REPORT_TO:-none}

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
