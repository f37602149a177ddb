#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) the wheels scripts/gpu-check.sh installs on a GPU machine that has
# python 3.12 with torch, cupy, cython, uvloop, xxhash, aiohttp, prometheus-client and rich, but no
# network. Run here, with network: scripts/gpu-wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
mkdir -p .whl
platforms=()
for n in 2_17 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${platforms[@]}" -d .whl \
    msgspec blake3 "cryptography>=42" "pynacl>=1.6,<1.7" cffi pycparser boto3 botocore s3transfer jmespath \
    python-dateutil six urllib3 dnspython tokenizers huggingface-hub hf-xet filelock fsspec packaging \
    pyyaml tqdm requests idna charset-normalizer certifi typing-extensions "transformers>=4.56" \
    safetensors regex pytest pytest-timeout pluggy iniconfig hypothesis sortedcontainers attrs jinja2 \
    markupsafe
# sdnotify ships only as an sdist (pure Python): built into a wheel here.
python3 -m pip wheel -q --no-deps -w .whl sdnotify
ls .whl | wc -l
