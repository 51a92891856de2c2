#!/usr/bin/env bash
# Drop-in check: our clip_encoder.py + vision_token_compression/ inside upstream LLaVA 1.2.x.
#
# Builds (or reuses) a throwaway virtualenv holding upstream LLaVA as published on PyPI
# (llava-torch 1.2.2.post1) on transformers 4.37.2, upstream's pin, with only the packages
# upstream's model code needs to import and run a forward pass on CPU. Then it copies this
# repository's clip_encoder.py over upstream's (keeping upstream's as clip_encoder_upstream.py
# for comparison), copies vision_token_compression/ into that venv's site-packages, and runs
# scripts/upstream_dropin_check.py there. This project itself is never installed in that venv.
#
# Environment:
#   TOCONV_UPSTREAM_VENV  venv path (default /tmp/toconv-upstream-venv); reused when complete
#   PYTHON                interpreter to build it with (default python3)
#   TOCONV_UPSTREAM_FRESH=1  rebuild the venv even if it is complete
# Extra arguments go to the check script (e.g. --verbose).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

VENV="${TOCONV_UPSTREAM_VENV:-/tmp/toconv-upstream-venv}"
PYTHON="${PYTHON:-python3}"

# What upstream's llava.model needs, found by trying: transformers (which brings tokenizers,
# safetensors, huggingface-hub, numpy) and Pillow (llava.mm_utils). Upstream's other requirements
# (gradio, peft, bitsandbytes, deepspeed, timm, ...) serve training and serving, not the model.
UPSTREAM="llava-torch==1.2.2.post1"
DEPS=(
    "transformers==4.37.2"
    "tokenizers>=0.14,<0.19"
    "safetensors>=0.4.1"
    "pillow>=10"
    "numpy>=1.24"
)
STAMP="$VENV/.toconv-upstream-dropin"
WANTED="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') $UPSTREAM torch==2.13.0 ${DEPS[*]}"

pip_install() {
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

if [[ "${TOCONV_UPSTREAM_FRESH:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" ]] \
      && "$VENV/bin/python" -c pass 2>/dev/null; then
    echo "Reusing upstream LLaVA venv at $VENV"
else
    echo "Building upstream LLaVA venv at $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # The CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
    pip_install torch==2.13.0
    pip_install "${DEPS[@]}"
    # Last and without dependencies: its metadata pins torch 2.0.1, gradio, bitsandbytes, ...
    pip_install --no-deps "$UPSTREAM"
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    ENC="$SITE/llava/model/multimodal_encoder"
    cp "$ENC/clip_encoder.py" "$ENC/clip_encoder_upstream.py"
    echo "$WANTED" > "$STAMP"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ENC="$SITE/llava/model/multimodal_encoder"
# Ours over upstream's, every run: the venv may be older than the working tree.
cp "$REPO/llava/model/multimodal_encoder/clip_encoder.py" "$ENC/clip_encoder.py"
rm -rf "$SITE/vision_token_compression"
cp -r "$REPO/vision_token_compression" "$SITE/vision_token_compression"
find "$SITE/vision_token_compression" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$ENC/__pycache__"

# Run from outside the repository, so its llava/ can never shadow upstream's.
cd "$VENV"
env -u PYTHONPATH "$VENV/bin/python" "$REPO/scripts/upstream_dropin_check.py" "$@"
