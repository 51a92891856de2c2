#!/usr/bin/env bash
# Floor check: the test suite on the lowest transformers pyproject.toml admits.
#
# The dev and CI venvs resolve transformers to the newest release in the range; this builds (or
# reuses) a virtualenv with the same torch, this project installed with its [test] extra, and
# transformers pinned to the floor read from pyproject.toml (so the two never disagree), then runs
# `python -m pytest -q -m "not slow"` there from the repository root.
#
# Environment:
#   TOCONV_FLOOR_VENV   venv path (default /tmp/toconv-floor-venv); reused when complete
#   PYTHON              interpreter to build it with (default python3)
#   TOCONV_FLOOR_FRESH=1  rebuild the venv even if it is complete
# Extra arguments go to pytest (e.g. tests/test_llava_model.py -x, or -m slow to override the
# marker filter: pytest keeps the last -m).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

VENV="${TOCONV_FLOOR_VENV:-/tmp/toconv-floor-venv}"
PYTHON="${PYTHON:-python3}"

# The floor is the `>=` bound of pyproject's transformers requirement ("transformers>=5.16.1,<6").
FLOOR="$(sed -n 's/^ *"transformers>=\([0-9][0-9.]*\)[,"].*/\1/p' pyproject.toml)"
if [[ -z "$FLOOR" ]]; then
    echo "check_transformers_floor: no \"transformers>=X...\" requirement in pyproject.toml" >&2
    exit 2
fi

STAMP="$VENV/.toconv-transformers-floor"
# The hash of pyproject's dependency lists too: a changed requirement rebuilds the venv (other edits,
# such as tool settings, do not).
DEPS_HASH="$(sed -n '/^dependencies = \[/,/^\]/p; /^\[project.optional-dependencies\]/,/^\[/p' pyproject.toml \
    | sha256sum | cut -c1-16)"
WANTED="$("$PYTHON" -c 'import sys; print(sys.version.split()[0])') torch==2.13.0 \
transformers==$FLOOR deps:$DEPS_HASH"

pip_install() {
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

if [[ "${TOCONV_FLOOR_FRESH:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" ]] \
      && "$VENV/bin/python" -c pass 2>/dev/null; then
    echo "Reusing transformers-floor venv at $VENV (transformers $FLOOR)"
else
    echo "Building transformers-floor venv at $VENV (transformers $FLOOR)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # The CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
    pip_install torch==2.13.0
    # One resolution with the pin, so tokenizers/huggingface-hub/... are ones the floor accepts.
    pip_install -e ".[test]" "transformers==$FLOOR"
    echo "$WANTED" > "$STAMP"
fi

installed="$("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)')"
if [[ "$installed" != "$FLOOR" ]]; then
    echo "check_transformers_floor: $VENV has transformers $installed, wanted $FLOOR;" \
         "rerun with TOCONV_FLOOR_FRESH=1" >&2
    exit 2
fi

start=$SECONDS
rc=0
env -u PYTHONPATH "$VENV/bin/python" -m pytest -q -m "not slow" "$@" || rc=$?
echo "transformers $FLOOR: pytest took $((SECONDS - start)) s (exit $rc)"
exit "$rc"
