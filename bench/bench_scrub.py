"""What scrubbing costs, and how fast a node that finds changed weights serves again.

    python bench/bench_scrub.py                 # everything, ~3 minutes
    python bench/bench_scrub.py --skip-node     # the scrubber alone (no node processes)

1. BLAKE3 on one core, 1 MiB slices (what a scrub step does): the rate that bounds scrubbing.
2. The scrubber alone over a synthetic range, driven by the validator's own loop shape (sleep until
   due, step): with the default config (a pass every 600 s, at most 2% of a core) and with an
   interval too short for the CPU budget (the budget must hold). CPU is the loop thread's CPU time
   over wall time, so sleeping and waking count too.
3. A real node on the test model (4 blocks, 1.8 MB): the validator process's CPU over a window with
   the default scrub config and with scrub = false, and the pass time as /status reports it.
4. The same node with a fast scrub: a byte flipped in its arena while it serves, ``--flips`` times;
   from the log, detection (the validator's line) to OPERATIONAL again (the supervisor's line).

Nothing is asserted; the table is the result. Numbers depend on the machine and its neighbours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import blake3  # noqa: E402

from butterfly.ipc import ChunkDigest, TensorPlacement  # noqa: E402
from butterfly.validator.scrub import SLICE_BYTES, HostArena, Scrubber  # noqa: E402

MiB = 1 << 20


def blake3_one_core(buf: memoryview, rounds: int = 3) -> float:
    """Best bytes per CPU second of single-threaded BLAKE3 over ``buf`` in scrub-sized slices (CPU
    time, not wall time: the budget is in CPU, and a busy machine stretches wall time)."""
    best = 0.0
    for _ in range(rounds):
        h = blake3.blake3(max_threads=1)
        t0 = time.thread_time()
        for off in range(0, len(buf), SLICE_BYTES):
            with buf[off : off + SLICE_BYTES] as part:
                h.update(part)
        best = max(best, len(buf) / max(time.thread_time() - t0, 1e-9))
    return best


def synthetic(size: int) -> tuple[bytearray, list[TensorPlacement]]:
    buf = bytearray(os.urandom(1 << 20)) * (size >> 20)
    n = 16
    step = size // n
    tensors = [
        TensorPlacement(f"model.layers.{i}.mlp.up_proj.weight", i + 1, i * step, step, b"") for i in range(n)
    ]
    view = memoryview(buf)
    tensors = [
        TensorPlacement(
            t.name,
            t.unit,
            t.arena_offset,
            t.length,
            blake3.blake3(view[t.arena_offset : t.arena_offset + t.length]).digest(),
        )
        for t in tensors
    ]
    return buf, tensors


def run_loop(
    buf: bytearray, tensors: list[TensorPlacement], interval_s: float, cpu_percent: float, seconds: float
) -> dict[str, float]:
    """The validator's loop shape for ``seconds``: wait until due (at most 0.25 s, its heartbeat), step."""
    chunks: list[ChunkDigest] = []
    s = Scrubber(HostArena(memoryview(buf)), tensors, chunks, interval_s=interval_s, cpu_percent=cpu_percent)
    cpu0, t0 = time.thread_time(), time.monotonic()
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        time.sleep(min(0.25, max(0.0, s.due() - now)))
        if time.monotonic() >= s.due():
            s.step()
    wall = time.monotonic() - t0
    cpu = time.thread_time() - cpu0
    # The first slice is hashed at once (a pass starts due): the steady rate leaves it out.
    rate = max(s.bytes - SLICE_BYTES, 0) / wall
    return {
        "cpu_percent": 100 * cpu / wall,
        "bytes_per_s": rate,
        "pass_s": s.last_pass_s or (len(buf) / rate if rate else float("inf")),
        "passes": s.passes,
    }


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stamp(line: str) -> float:
    return datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")).timestamp()


def node_rows(work: Path, window_s: float, flips: int) -> list[tuple[str, str]]:
    from butterfly.loader.process import place
    from butterfly.weights.build import build_manifest
    from butterfly.weights.layout import LayerRange, load_layout
    from butterfly.weights.manifest import MANIFEST_FILE, read_manifest, write_manifest
    from butterfly.weights.testmodel import make_test_model
    from tests.nodeharness import Node, free_port, write_config

    model = make_test_model(work / "model", layers=4, hidden=128, vocab=512, shards=2)
    write_manifest(build_manifest(model, chunk_bytes=64 * 1024)[0], model / MANIFEST_FILE)
    placements = place(
        load_layout(model).tensors_for_blocks(LayerRange(0, 4)), read_manifest(model / MANIFEST_FILE)
    )[0]
    rows: list[tuple[str, str]] = []

    def start(name: str, extra: str) -> Node:
        port = free_port()
        d = work / name
        d.mkdir()
        cfg = write_config(
            d / "node.toml", model, node_id=f"bs{os.getpid()}-{name}", api_port=port, extra=extra
        )
        cfg.write_text(cfg.read_text().replace("heartbeat_timeout_s = 3.0", "heartbeat_timeout_s = 30.0"))
        node = Node(cfg, port)
        node.wait_state("OPERATIONAL", timeout=180)
        return node

    for label, extra in (("default scrub", ""), ("scrub = false", "[validator]\nscrub = false\n")):
        node = start(label.split()[0] + label.split()[-1], extra)
        try:
            st = node.status()
            assert st is not None
            pid = next(c["pid"] for c in st["children"] if c["name"] == "validator")
            c0, t0 = proc_cpu_s(pid), time.monotonic()
            time.sleep(window_s)
            cpu = proc_cpu_s(pid) - c0
            wall = time.monotonic() - t0
            st = node.status()
            assert st is not None
            i = st["integrity"]
            rows.append(
                (
                    f"node, test model, {label}: validator process CPU",
                    f"{100 * cpu / wall:.3f}% of one core over {wall:.0f} s; scrubbed "
                    f"{i['scrub_bytes']} bytes for {i['scrub_cpu_seconds'] * 1000:.2f} ms of CPU",
                )
            )
        finally:
            node.stop()

    node = start("fast", "[validator]\nscrub_interval_s = 2\nscrub_cpu_percent = 50\n")
    try:
        times = []
        victims = [p for p in placements if p.length > 4096]
        for k in range(flips):
            victim = victims[k % len(victims)]
            (arena,) = Path("/dev/shm").glob(f"butterfly-*-{node.proc.pid}-arena")
            with open(arena, "r+b") as f:
                f.seek(victim.arena_offset + 100)
                b = f.read(1)[0]
                f.seek(victim.arena_offset + 100)
                f.write(bytes([b ^ 1]))
            node.wait_for(
                lambda s, k=k: s["integrity"]["repairs"] == k + 1 and s["state"] == "OPERATIONAL",
                120,
                "repair",
            )
            log = node.log().splitlines()
            found = [
                stamp(ln) for ln in log if "scrubbing found the weights in memory" in ln and "ERROR" in ln
            ]
            back = [stamp(ln) for ln in log if "state READY -> OPERATIONAL" in ln]
            times.append(back[-1] - found[-1])
        rows.append(
            (
                "node, test model: detection to OPERATIONAL",
                f"median {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over "
                f"{len(times)} flips (repair from the cache, full re-validation, coordinator's "
                "acceptance, operational gate)",
            )
        )
    finally:
        node.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-mib", type=int, default=256, help="synthetic range for the scrubber alone")
    ap.add_argument("--seconds", type=float, default=20.0, help="each scrubber-alone run")
    ap.add_argument("--window", type=float, default=30.0, help="node CPU measurement window")
    ap.add_argument("--flips", type=int, default=5)
    ap.add_argument("--skip-node", action="store_true")
    args = ap.parse_args()

    buf, tensors = synthetic(args.size_mib * MiB)
    rate = blake3_one_core(memoryview(buf))
    rows = [("BLAKE3, one core, 1 MiB slices", f"{rate / 1e9:.2f} GB per CPU second")]
    for share in (2.0, 5.0):
        rows.append(
            (
                f"range a {share:g}% budget covers in 600 s",
                f"{rate * share / 100 * 600 / 2**30:.1f} GiB (larger ranges: passes take longer)",
            )
        )
    default = run_loop(buf, tensors, 600.0, 2.0, args.seconds)
    rows.append(
        (
            f"scrubber, default (600 s, 2%), {args.size_mib} MiB",
            f"{default['cpu_percent']:.3f}% CPU, "
            f"{default['bytes_per_s'] / 1e6:.2f} MB/s: a pass in {default['pass_s']:.0f} s",
        )
    )
    tight = run_loop(buf, tensors, 1.0, 2.0, args.seconds)
    rows.append(
        (
            f"scrubber, interval 1 s at 2%, {args.size_mib} MiB",
            f"{tight['cpu_percent']:.2f}% CPU, "
            f"{tight['bytes_per_s'] / 1e6:.1f} MB/s: a pass in {tight['pass_s']:.0f} s (CPU-bound)",
        )
    )
    if not args.skip_node:
        with tempfile.TemporaryDirectory(prefix="butterfly-bench-scrub-") as work:
            rows += node_rows(Path(work), args.window, args.flips)
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


if __name__ == "__main__":
    main()
