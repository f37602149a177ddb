#!/usr/bin/env bash
# The test command: installs what the tests need, then lint, type check and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k board).
#
# On Debian/Ubuntu as root it installs the system tools the tests drive for real (dnsmasq for DNS SRV,
# rpm and lintian for the packages, openssl for test certificates, node/npm for the S3 server, systemd
# and util-linux for the service tests, iproute2 and nftables for the chaos suite's
# network namespaces, python3.11 with headers and venv for the package build).
# Otherwise it names what is missing; those tests then skip, each saying why, and the summary lists
# them (.ci/run fails on any skip but a GPU test's).
set -euo pipefail
cd "$(dirname "$0")/.."

# command (or file) -> Debian package
tools=(
    "dnsmasq:dnsmasq-base"
    "rpm:rpm"
    "lintian:lintian"
    "openssl:openssl"
    "node:nodejs"
    "npm:npm"
    "systemctl:systemd"
    "unshare:util-linux"
    "nsenter:util-linux"
    "setpriv:util-linux"
    "gcc:gcc"
    "ip:iproute2"
    "nft:nftables"
    "/usr/bin/python3.11:python3.11"
    "/usr/include/python3.11/Python.h:python3.11-dev"
    "/usr/lib/python3.11/ensurepip/__init__.py:python3.11-venv"
)
missing=()
for entry in "${tools[@]}"; do
    what=${entry%%:*} pkg=${entry##*:}
    if [[ $what == /* ]]; then
        [ -e "$what" ] && continue
    else
        PATH=$PATH:/usr/sbin:/sbin command -v "$what" >/dev/null && continue
    fi
    [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing ${missing[*]} (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        why="not root"
        [ "$(id -u)" = 0 ] && why="no apt-get"
        echo "== missing system packages (${why}, so not installed): ${missing[*]}" >&2
        echo "   install them (Debian: sudo apt-get install ${missing[*]}) or the tests that need them skip;" >&2
        echo "   the service tests need root in any case" >&2
    fi
fi

echo "== python environment (.venv)"
scripts/bootstrap.sh
echo "== ruff"
.venv/bin/ruff check butterfly tests bench
.venv/bin/ruff format --check butterfly tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
# A private temp dir: concurrent runs as one user would otherwise share /tmp/pytest-of-<user> and
# delete each other's numbered directories. The packages tests/test_systemd.py builds go there too.
work=$(mktemp -d "${TMPDIR:-/tmp}/butterfly-test-XXXXXX")
trap 'rm -rf "$work"' EXIT
export BUTTERFLY_DIST_DIR="$work/dist"
.venv/bin/python -m pytest -n 2 -q -p no:cacheprovider --basetemp="$work/pytest" "$@"
