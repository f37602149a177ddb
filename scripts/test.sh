#!/usr/bin/env bash
# The test command: installs what it needs, then lint, type check and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k board).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
echo "== ruff"
.venv/bin/ruff check butterfly tests bench
.venv/bin/ruff format --check butterfly tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -n 2 -q "$@"
