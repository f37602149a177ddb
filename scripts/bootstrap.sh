#!/usr/bin/env bash
# Creates .venv (if missing) and installs Butterfly with its dev tools, building the Cython extension.
# Needs only Python >= 3.10, pip and gcc. Re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $PY"
    "$PY" -m venv .venv
fi
stamp=.venv/.butterfly-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ -n "$(find csrc -newer "$stamp" -print -quit 2>/dev/null)" ]; then
    echo "== installing Butterfly and its dependencies into .venv (torch, transformers, ...: a few minutes"
    echo "   the first time; each package is named as it is fetched; full log in .venv/pip.log)"
    .venv/bin/pip install -q --upgrade pip
    # pip's own lines go to a log; "Collecting X" lines show progress. On failure the log's end is shown.
    .venv/bin/pip install -e '.[dev]' >.venv/pip.log 2>&1 </dev/null &
    pip_pid=$!
    last=0
    while kill -0 "$pip_pid" 2>/dev/null; do
        n=$(grep -c '^Collecting' .venv/pip.log 2>/dev/null || true)
        if [ "${n:-0}" -gt "$last" ]; then
            grep '^Collecting' .venv/pip.log | sed -n "$((last + 1)),${n}p" | sed 's/^Collecting /   fetching /; s/ (.*//'
            last=$n
        fi
        sleep 1
    done
    if ! wait "$pip_pid"; then
        tail -30 .venv/pip.log >&2
        echo "bootstrap: pip install failed (full log: .venv/pip.log)" >&2
        exit 1
    fi
    echo "== .venv ready"
    touch "$stamp"
fi
