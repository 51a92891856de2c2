#!/bin/bash
# pretrain.sh with ToConv compression: CLIP's 24×24 patch grid reaches the LLM as COMPRESS_TO×COMPRESS_TO
# tokens (default 12: 144 tokens; COMPRESS_TO=8: 64). All other settings as pretrain.sh.
set -euo pipefail
COMPRESS_TO=${COMPRESS_TO:-12} exec bash "$(dirname "$0")/pretrain.sh" "$@"
