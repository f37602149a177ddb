#!/usr/bin/env bash
# Creates .venv (if missing) and installs Butterfly with its dev tools, building the Cython extension.
# Needs only Python >= 3.10, pip and gcc. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.butterfly-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ -n "$(find csrc -newer "$stamp" -print -quit 2>/dev/null)" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
