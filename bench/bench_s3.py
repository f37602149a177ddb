"""S3 part of the load suite: S3Source against plain boto3 downloads of the same object, same run.

Plugged into bench/bench_load.py through its ``s3_rows`` hook (``measure``), or run alone:
``python bench/bench_s3.py [--size-mib 256] [--repeats 3]``. The server is a real s3rver on loopback
(tests/s3harness.py installs it with npm on first use). Asserts nothing.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.s3harness import S3Server, measure_throughput, start_s3rver  # noqa: E402

_server: S3Server | None = None


def server() -> S3Server:
    """One s3rver for the whole benchmark run, stopped at exit."""
    global _server
    if _server is None:
        directory = Path(tempfile.mkdtemp(prefix="butterfly-bench-s3-"))
        _server = start_s3rver(directory)
        atexit.register(_server.stop)
        atexit.register(shutil.rmtree, directory, True)
    return _server


def measure(suite: Any, workload: Any, args: argparse.Namespace) -> list[tuple[str, str, str, float]]:
    """Adds one round of S3Source and boto3 timings to ``suite``; returns the S3 target row."""
    size = 256 << 20
    mbps = measure_throughput(server(), size=size, repeats=1)
    labels = {
        "s3source": ("s3_ours", "Butterfly S3Source ranged reads (8 MiB, 4 in flight)"),
        "get_object": ("s3_get_object", "boto3 get_object().read()"),
        "download_fileobj": ("s3_download_fileobj", "boto3 download_fileobj (4 threads)"),
        "download_file": ("s3_download_file", "boto3 download_file (4 threads)"),
    }
    for name, (key, label) in labels.items():
        suite.result(key, label, size).seconds.append(size / (mbps[name] * 1e6))
    best = max(("s3_get_object", "s3_download_fileobj", "s3_download_file"), key=lambda k: suite.best(k) or 0)
    return [("S3 >= 0.9x best plain boto3", "s3_ours", best, 0.9)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    r = measure_throughput(server(), size=args.size_mib << 20, repeats=args.repeats)
    for name in ("s3source", "get_object", "download_fileobj", "download_file"):
        print(f"{name:>18}: {r[name]:8.1f} MB/s")
    for name in ("ratio_get_object", "ratio_download_fileobj", "ratio_download_file", "ratio_best"):
        print(f"{name:>24}: {r[name]:.2f}x")
    print(f"target S3Source >= 0.9x best plain boto3: {'ok' if r['ratio_best'] >= 0.9 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
