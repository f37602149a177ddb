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
# A private base temp dir: concurrent runs as one user would otherwise share /tmp/pytest-of-<user>
# and delete each other's numbered directories.
basetemp=$(mktemp -d "${TMPDIR:-/tmp}/butterfly-test-XXXXXX")
trap 'rm -rf "$basetemp"' EXIT
.venv/bin/python -m pytest -n 2 -q -p no:cacheprovider --basetemp="$basetemp" "$@"
