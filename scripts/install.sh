#!/usr/bin/env bash
# Create a virtual environment with var_train installed (editable, with test extras).
# torch and torchvision go in first at pinned versions and stay pinned while the rest installs,
# so no other package can pull a different (multi-GB) torch build.
#   VENV=path   where to put it (default .venv)
#   TORCH_PINS  override the pins, e.g. "torch==2.6.0 torchvision==0.21.0"
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_PINS="${TORCH_PINS:-torch==2.14.1 torchvision==0.29.1}"

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet $TORCH_PINS

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf '%s\n' $TORCH_PINS > "$constraints"
PIP_CONSTRAINT="$constraints" "$VENV/bin/python" -m pip install --quiet -e ".[test]"
echo "installed var_train into $VENV"
