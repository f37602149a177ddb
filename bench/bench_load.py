"""Load throughput: Butterfly's streamer against this machine's limits and the loaders users would pick.

Run: ``python bench/bench_load.py [--model DIR | --size-gib 4] [--quick] [--repeat N] [--json FILE]``.
Without ``--model`` a deterministic Llama checkpoint of about ``--size-gib`` is generated once (float16,
so numpy can read it; kept under ``--workdir``). ``--quick`` uses ~256 MiB and runs in seconds.

In one run, over the same tensor bytes (the whole model: what a one-node cluster loads):
  limits       read into a reused buffer; read + xxh3; BLAKE3 multi-threaded over the loaded arena;
               cold read after dropping the page cache (root only; skipped with a note otherwise)
  Butterfly    the Cython streamer and its Python twin, xxh3 inline and compared with the expected
               digests, into a pre-faulted /dev/shm arena (as the loader does); validation
               (butterfly.weights.hashing.blake3_regions over the validator's per-unit regions); a cold load;
               and, for the record, a load into an arena that was not pre-faulted
  others       safetensors load_file / safe_open with every byte touched (xor-folded), Run:ai Model
               Streamer in its buffered modes, fastsafetensors (CPU, no GDS), tensorizer: each in a
               subprocess, where installed (``pip install torch runai-model-streamer fastsafetensors
               tensorizer``); a loader that is missing or fails is listed with the reason
Method: every measurement runs once per round, rounds interleave all of them (so a noisy neighbour
hits all alike), and the table shows the best round (GB/s = 1e9 bytes/s) and the median; ratios use
the best rounds. The S3 suite plugs in through ``bench/bench_s3.py`` (see ``s3_rows``).

Asserts nothing: targets are read off the table (ok / MISSED).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import blake3  # noqa: E402
import xxhash  # noqa: E402

from butterfly.board.shm import create_segment, unlink_segment  # noqa: E402
from butterfly.weights import streamer  # noqa: E402
from butterfly.weights.hashing import Region, Span, blake3_regions  # noqa: E402
from butterfly.weights.layout import LayerRange, TensorEntry, load_layout  # noqa: E402
from butterfly.weights.streamer import ReadJob, open_files, stream_into  # noqa: E402

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30
ARENA_ALIGN = 64  # as butterfly/loader/process.py places tensors


# --- the model ------------------------------------------------------------------------------------------


def model_shape(size_bytes: int) -> dict[str, int]:
    """Llama-ish dimensions whose checkpoint is about ``size_bytes`` (float16)."""
    from butterfly.weights.testmodel import model_size_bytes

    hidden, vocab, heads, kv = (2048, 32000, 16, 8) if size_bytes >= 2 * GiB else (1024, 8192, 8, 4)
    dims = {"layers": 1, "hidden": hidden, "heads": heads, "kv_heads": kv, "vocab": vocab, "shards": 1}
    while model_size_bytes(**dims, dtype="float16") < size_bytes and dims["layers"] < 4096:  # type: ignore[arg-type]
        dims["layers"] += 1
    # About 1 GiB per shard, as Hugging Face checkpoints are cut (never more shards than units).
    dims["shards"] = max(1, min(round(size_bytes / GiB), dims["layers"] + 2))
    return dims


def ensure_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from butterfly.weights.testmodel import make_test_model

    size = int((0.25 if args.quick else args.size_gib) * GiB)
    dims = model_shape(size)
    name = "model-" + "-".join(f"{k}{v}" for k, v in dims.items())
    path = Path(args.workdir) / name
    if not path.exists():
        print(f"generating a {size / GiB:.2f} GiB test model in {path} ...", flush=True)
        t = time.monotonic()
        make_test_model(path, dtype="float16", **dims)  # type: ignore[arg-type]
        print(f"  done in {time.monotonic() - t:.1f}s", flush=True)
    return path


@dataclass
class Workload:
    model: Path
    tensors: list[TensorEntry]
    jobs: list[ReadJob]
    total: int
    arena_bytes: int
    files: list[str]
    units: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)


def workload(model: Path) -> Workload:
    layout = load_layout(model)
    tensors = layout.tensors_for_blocks(LayerRange(0, layout.num_blocks))
    jobs, off = [], 0
    units: dict[int, list[tuple[str, int, int]]] = {}
    for t in tensors:
        off = (off + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
        jobs.append(ReadJob(t.file, t.offset, t.length, off, t.name))
        units.setdefault(t.unit, []).append((t.name, off, t.length))
        off += t.length
    files = sorted({t.file for t in tensors})
    return Workload(model, tensors, jobs, sum(t.length for t in tensors), max(off, 1), files, units)


def validator_regions(w: Workload) -> list[Region]:
    """The validator's per-unit framing: per tensor in name order, name\\0 + u64 length, then its bytes."""
    regions: list[Region] = []
    for unit in sorted(w.units):
        region: list[bytes | Span] = []
        for name, off, length in sorted(w.units[unit]):
            region += [name.encode() + b"\0" + length.to_bytes(8, "little"), Span(off, length)]
        regions.append(region)
    return regions


# --- measurements ---------------------------------------------------------------------------------------


def read_limit(
    w: Workload,
    fds: dict[str, int],
    threads: int,
    buf_bytes: int,
    hash_: bool,
    into: memoryview | None = None,
) -> None:
    """Every tensor byte read (and xxh3'd) into one reused, cache-hot buffer per thread: no arena, no
    page faults. The ranges are dealt round-robin to the threads in chunks of ``buf_bytes``. With
    ``into``, each piece goes to its place in that arena instead (what any loader must write)."""
    pieces = [
        (fds[j.file], j.file_offset + o, min(buf_bytes, j.length - o), j.arena_offset + o)
        for j in w.jobs
        for o in range(0, j.length, buf_bytes)
    ]

    def work(k: int) -> None:
        buf = memoryview(bytearray(buf_bytes))
        for fd, off, n, at in pieces[k::threads]:
            view = buf[:n] if into is None else into[at : at + n]
            got = 0
            while got < n:
                r = os.preadv(fd, [view[got:]], off + got)
                if r == 0:
                    raise EOFError(off)
                got += r
            if hash_:
                xxhash.xxh3_64_intdigest(view)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))


MADV_HUGEPAGE = 14


def fresh_limit(w: Workload, fds: dict[str, int], threads: int, kind: str) -> float:
    """Read + xxh3 of every tensor into its place in memory that nobody touched before: the mapping,
    its page faults, the reads and the hashes are timed; the unmap is not. ``kind``: "anon" (private
    anonymous pages), "anon_thp" (the same with MADV_HUGEPAGE, where the kernel allows it), "shm" (a
    /dev/shm file, as a shared arena must be)."""
    import mmap

    t = time.perf_counter()
    if kind == "shm":
        name = f"/dev/shm/butterfly-bench-{os.getpid()}-fresh"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(name)
        os.ftruncate(fd, w.arena_bytes)
        m = mmap.mmap(fd, w.arena_bytes, flags=mmap.MAP_SHARED)
        os.close(fd)
    else:
        m = mmap.mmap(-1, w.arena_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if kind == "anon_thp":
            m.madvise(MADV_HUGEPAGE)
    with memoryview(m) as mv:
        read_limit(w, fds, threads, MiB, True, mv)
    seconds = time.perf_counter() - t
    m.close()
    return seconds


def load_with_allocation(
    w: Workload, fds: dict[str, int], chunk: int, conc: int, expected: list[list[int]]
) -> float:
    """The loader's loading phase: a new arena (butterfly.loader.arena.allocate, as the loader makes it),
    then the stream with xxh3 checked against the manifest's digests. The unmap is not timed."""
    from butterfly.loader.arena import allocate

    name = f"butterfly-bench-{os.getpid()}-{time.monotonic_ns()}-arena"
    t = time.perf_counter()
    seg = allocate(name, w.arena_bytes, lambda: None)
    try:
        unlink_segment(name)
        with memoryview(seg.buf) as mv:
            stream_into(w.jobs, mv, fds, chunk_bytes=chunk, concurrency=conc, expected=expected)
        return time.perf_counter() - t
    finally:
        seg.close()


def drop_caches() -> str | None:
    """Drop the page cache; None if done, else why not."""
    if os.geteuid() != 0:
        return "not root"
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"cannot write /proc/sys/vm/drop_caches: {e.strerror}"
    return None


@dataclass
class Result:
    key: str
    label: str
    nbytes: int
    seconds: list[float] = field(default_factory=list)
    note: str = ""
    unit: str = "GB/s"
    """How the table shows it: "GB/s" (a phase's throughput) or "s" (a wait, end to end)."""

    def gbps(self) -> list[float]:
        return [self.nbytes / s / GB for s in self.seconds if s > 0]

    @property
    def best(self) -> float | None:
        g = self.gbps()
        return max(g) if g else None

    @property
    def median(self) -> float | None:
        g = self.gbps()
        return statistics.median(g) if g else None


class Suite:
    def __init__(self) -> None:
        self.results: dict[str, Result] = {}
        # (label, ours_key, reference_key, target ratio) rows added by hooks (S3).
        self.extra_targets: list[tuple[str, str, str, float]] = []
        self.node_runs: list[object] = []  # e2e.NodeRun of each round, for the breakdown

    def result(self, key: str, label: str, nbytes: int, unit: str = "GB/s") -> Result:
        if key not in self.results:
            self.results[key] = Result(key, label, nbytes, unit=unit)
        return self.results[key]

    def attempt(self, key: str, label: str, nbytes: int, fn: Callable[[], float], unit: str = "GB/s") -> None:
        """Like ``time``, but ``fn`` returns the seconds to count (it leaves out its own clean-up)."""
        r = self.result(key, label, nbytes, unit)
        try:
            r.seconds.append(fn())
        except Exception as e:
            r.note = f"failed: {type(e).__name__}: {e}"[:300]

    def time(self, key: str, label: str, nbytes: int, fn: Callable[[], object]) -> None:
        r = self.result(key, label, nbytes)
        try:
            t = time.perf_counter()
            fn()
            r.seconds.append(time.perf_counter() - t)
        except Exception as e:
            r.note = f"failed: {type(e).__name__}: {e}"[:200]

    def best(self, key: str) -> float | None:
        r = self.results.get(key)
        return r.best if r else None


@contextlib.contextmanager
def arena(size: int, prefault: bool) -> Iterator[memoryview]:
    name = f"butterfly-bench-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}-arena"
    seg = create_segment(name, size, prefault=prefault)
    unlink_segment(name)  # the mapping stays; nothing is left in /dev/shm if we are killed
    try:
        with memoryview(seg.buf) as mv:
            yield mv
    finally:
        seg.close()


# --- other loaders, each in a subprocess ----------------------------------------------------------------


def _xor_every_byte(a: object) -> int:
    """Reads every byte of an array (numpy or torch): the loader cannot hand back lazy pages unnoticed."""
    import numpy as np

    if hasattr(a, "numpy"):  # torch: a byte view that numpy can read without a copy
        a = a.contiguous().view(-1).view(__import__("torch").uint8).numpy()  # type: ignore[attr-defined]
    u8 = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    n8 = u8.size // 8 * 8
    acc = int(np.bitwise_xor.reduce(u8[:n8].view(np.uint64))) if n8 else 0
    return acc ^ int(np.bitwise_xor.reduce(u8[n8:])) if u8.size > n8 else acc


def worker(name: str, model: Path, files: list[str]) -> dict[str, object]:
    """Runs inside the subprocess: loads the whole model with loader ``name``, returns seconds and bytes."""
    paths = [str(model / f) for f in files]
    nbytes = 0
    if name in ("safetensors_load_file", "safetensors_safe_open"):
        try:
            from safetensors import safe_open
            from safetensors.numpy import load_file

            framework = "np"
            t = time.perf_counter()
            if name == "safetensors_load_file":
                for p in paths:
                    for a in load_file(p).values():
                        _xor_every_byte(a)
                        nbytes += a.nbytes
            else:
                for p in paths:
                    with safe_open(p, framework=framework) as f:
                        for k in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                            a = f.get_tensor(k)
                            _xor_every_byte(a)
                            nbytes += a.nbytes
            return {"seconds": time.perf_counter() - t, "bytes": nbytes, "end_mono": time.monotonic()}
        except (TypeError, ValueError) as e:  # bfloat16: numpy cannot hold it
            raise RuntimeError(
                f"numpy cannot read this checkpoint ({e}); install torch for framework='pt'"
            ) from e
    if name.startswith("runai"):
        os.environ["RUNAI_STREAMER_FS_STRATEGY"] = name.split(":", 1)[1]
        from runai_model_streamer import SafetensorsStreamer

        t = time.perf_counter()
        with SafetensorsStreamer() as s:
            s.stream_files(paths)
            for _, tensor in s.get_tensors():
                nbytes += tensor.numel() * tensor.element_size()
        return {"seconds": time.perf_counter() - t, "bytes": nbytes, "end_mono": time.monotonic()}
    if name == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        t = time.perf_counter()
        with fastsafe_open(filenames=paths, nogds=True, device="cpu") as f:
            for k in f.keys():  # noqa: SIM118 (not a dict)
                tensor = f.get_tensor(k)
                nbytes += tensor.numel() * tensor.element_size()
        return {"seconds": time.perf_counter() - t, "bytes": nbytes, "end_mono": time.monotonic()}
    if name == "tensorizer":
        from tensorizer import TensorDeserializer, TensorSerializer

        serialized = model / "bench.tensors"
        if not serialized.exists():
            from safetensors.torch import load_file as load_pt

            tmp = serialized.with_suffix(".tmp")
            ser = TensorSerializer(str(tmp))
            state = {}
            for p in paths:
                state.update(load_pt(p))
            ser.write_state_dict(state)
            ser.close()
            del state
            tmp.rename(serialized)
        t = time.perf_counter()
        d = TensorDeserializer(str(serialized), device="cpu")
        for tensor in d.values():
            nbytes += tensor.numel() * tensor.element_size()
        d.close()
        return {"seconds": time.perf_counter() - t, "bytes": nbytes}
    raise ValueError(f"unknown loader {name!r}")


def run_worker(suite: Suite, name: str, label: str, w: Workload, python: str, timeout_s: float) -> None:
    r = suite.result(name, label, w.total)
    if r.note and not r.seconds:
        return  # failed in an earlier round: do not pay for it again
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--model", str(w.model)]
    spawned = time.monotonic()
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "RUNAI_STREAMER_LOG_LEVEL": "ERROR"},
        )
    except subprocess.TimeoutExpired:
        r.note = f"timed out after {timeout_s:.0f}s"
        return
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        r.note = f"not run: {err}"[:200]
        return
    res = json.loads(lines[-1])
    r.seconds.append(float(res["seconds"]))
    if int(res["bytes"]) != w.total:
        r.note = f"loaded {res['bytes']} bytes, expected {w.total}"
    if name in E2E_OTHERS:
        # From the spawn to its last tensor in memory: interpreter, imports, allocation, load.
        e2e = suite.result(f"e2e:{name}", E2E_OTHERS[name], w.total, unit="s")
        e2e.seconds.append(float(res["end_mono"]) - spawned)


E2E_OTHERS = {
    "runai:sync_buffered": "Run:ai (sync_buffered): process start -> all tensors in CPU memory",
    "runai:io_uring_buffered": "Run:ai (io_uring_buffered): process start -> all in CPU memory",
    "fastsafetensors": "fastsafetensors (CPU): process start -> all tensors in memory",
}


# --- the S3 hook ----------------------------------------------------------------------------------------


def s3_rows(suite: Suite, w: Workload, args: argparse.Namespace) -> list[tuple[str, str, str, float]]:
    """Hook for the S3 suite: ``bench/bench_s3.py`` may define ``measure(suite, workload, args)``, adding
    results to ``suite`` and returning target rows ``(label, ours_key, reference_key, target_ratio)``,
    e.g. ``("S3 >= 0.9x best plain boto3", "s3_ours", "s3_boto3_best", 0.9)``."""
    try:
        mod = importlib.import_module("bench_s3")
    except ImportError:
        return []
    measure: Callable[[Suite, Workload, argparse.Namespace], list[tuple[str, str, str, float]]] = mod.measure
    return measure(suite, w, args)


# --- the run --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Suite:
    model = ensure_model(args)
    w = workload(model)
    cores = os.cpu_count() or 1
    conc, chunk = args.concurrency, args.chunk_mib * MiB
    print(
        f"model {model}: {len(w.tensors)} tensors, {w.total / GiB:.2f} GiB in {len(w.files)} files; "
        f"{cores} cores; chunk {args.chunk_mib} MiB, concurrency {conc}; {args.repeat} rounds",
        flush=True,
    )
    suite = Suite()
    others = [
        ("safetensors_load_file", "safetensors load_file (+ every byte xor'd)"),
        ("safetensors_safe_open", "safetensors safe_open (+ every byte xor'd)"),
        ("runai:sync_buffered", "Run:ai streamer, buffered (sync_buffered)"),
        ("runai:io_uring_buffered", "Run:ai streamer, buffered (io_uring_buffered)"),
        ("fastsafetensors", "fastsafetensors (CPU, nogds)"),
        ("tensorizer", "tensorizer (deserialize)"),
    ]
    with open_files(model, w.files) as fds:
        # Warm the page cache and compute the expected digests the way the manifest would.
        expected = [
            [
                xxhash.xxh3_64_intdigest(os.pread(fds[j.file], n, j.file_offset + o))
                for o, n in streamer.chunk_spans(j.length, chunk)
            ]
            for j in w.jobs
        ]
        t = time.perf_counter()
        with arena(w.arena_bytes, prefault=True) as buf:
            prefault_s = time.perf_counter() - t
            suite.result(
                "prefault", "pre-fault the arena (create_segment prefault=True)", w.arena_bytes
            ).seconds.append(prefault_s)
            regions = validator_regions(w)
            impls = streamer.available()
            for rnd in range(args.repeat):
                print(f"round {rnd + 1}/{args.repeat}", flush=True)
                for bb in (MiB, 8 * MiB):
                    suite.time(
                        f"limit_read_{bb // MiB}M",
                        f"limit: read into a reused {bb // MiB} MiB buffer",
                        w.total,
                        functools.partial(read_limit, w, fds, cores, bb, False),
                    )
                    suite.time(
                        f"limit_xxh3_{bb // MiB}M",
                        f"limit: read + xxh3, reused {bb // MiB} MiB buffer",
                        w.total,
                        functools.partial(read_limit, w, fds, cores, bb, True),
                    )
                for impl in impls:

                    def load(impl: streamer.ImplName = impl) -> None:
                        stream_into(
                            w.jobs,
                            buf,
                            fds,
                            chunk_bytes=chunk,
                            concurrency=conc,
                            expected=expected,
                            impl=impl,
                        )

                    suite.time(f"ours_{impl}", f"Butterfly {impl}: stream + xxh3 + verify", w.total, load)
                suite.time(
                    "limit_arena",
                    "limit: read into the pre-faulted arena, no hash (8 MiB)",
                    w.total,
                    functools.partial(read_limit, w, fds, cores, 8 * MiB, False, buf),
                )
                suite.time(
                    "blake3_mt",
                    "limit: BLAKE3 multi-threaded (one pass over the arena)",
                    w.arena_bytes,
                    lambda: blake3.blake3(buf, max_threads=blake3.blake3.AUTO).digest(),
                )
                suite.time(
                    "validation",
                    "Butterfly validation: blake3_regions per unit",
                    w.total,
                    lambda: blake3_regions(buf, regions, cores),
                )
            # Loaded bytes must equal the files' (the last round's arena); a broken streamer would be fast.
            for j in w.jobs[:: max(1, len(w.jobs) // 64)]:
                assert bytes(buf[j.arena_offset : j.arena_offset + j.length]) == os.pread(
                    fds[j.file], j.length, j.file_offset
                ), j.tensor
            suite.extra_targets = s3_rows(suite, w, args)

            why = None if args.no_cold else drop_caches()
            cold = suite.result(
                "cold_read", "cold limit: read into a reused buffer after drop_caches", w.total
            )
            cold_ours = suite.result("cold_ours", f"Butterfly {streamer.DEFAULT_IMPL} cold load", w.total)
            if args.no_cold:
                cold.note = cold_ours.note = "skipped (--no-cold)"
            elif why is not None:
                cold.note = cold_ours.note = f"skipped: {why}"
            else:
                for _ in range(args.cold_repeat):
                    for threads in sorted({1, cores}):
                        drop_caches()
                        suite.time(
                            f"cold_read_{threads}t",
                            f"cold limit: read, {threads} thread(s), 8 MiB buffer",
                            w.total,
                            functools.partial(read_limit, w, fds, threads, 8 * MiB, False),
                        )
                    drop_caches()
                    suite.time(
                        "cold_ours",
                        cold_ours.label,
                        w.total,
                        lambda: stream_into(
                            w.jobs, buf, fds, chunk_bytes=chunk, concurrency=conc, expected=expected
                        ),
                    )
                combine(suite, "cold_read", cold.label, [f"cold_read_{t}t" for t in sorted({1, cores})])

        # Once, for the record: the same load into an arena nobody pre-faulted.
        with arena(w.arena_bytes, prefault=False) as fresh:
            suite.time(
                "ours_fresh",
                f"Butterfly {streamer.DEFAULT_IMPL} into a NOT pre-faulted arena",
                w.total,
                lambda: stream_into(
                    w.jobs, fresh, fds, chunk_bytes=chunk, concurrency=conc, expected=expected
                ),
            )

        # Second phase, with the pre-faulted arena given back (a real node and Run:ai each hold the
        # model too): whole loads into fresh memory, every cost counted, interleaved round by round.
        for rnd in range(args.repeat):
            print(f"end-to-end round {rnd + 1}/{args.repeat}", flush=True)
            suite.attempt(
                "ours_alloc",
                "Butterfly loading phase: allocate arena + stream + verify",
                w.total,
                functools.partial(load_with_allocation, w, fds, chunk, conc, expected),
            )
            for kind in ("anon", "anon_thp", "shm"):
                suite.attempt(
                    f"limit_fresh_{kind}",
                    f"limit: read + xxh3 into fresh memory ({kind})",
                    w.total,
                    functools.partial(fresh_limit, w, fds, cores, kind),
                )
            if not args.skip_node:
                node_round(suite, w)
            if not args.skip_others:
                for name, label in others:
                    run_worker(suite, name, label, w, args.python, args.worker_timeout)
    return suite


def node_round(suite: Suite, w: Workload) -> None:
    """One real node from process start to READY=1 (bench/e2e.py), with its phase breakdown."""
    import e2e

    r = suite.result("e2e:node", "Butterfly node: process start -> READY (validated, warm)", w.total, "s")
    try:
        e2e.ensure_manifest(w.model)
        run = e2e.run_node(w.model)
    except Exception as e:
        r.note = f"failed: {type(e).__name__}: {e}"[:300]
        print(r.note, flush=True)
        return
    r.seconds.append(run.ready_s)
    if run.operational_s is not None:
        op = suite.result("e2e:node_op", "Butterfly node: process start -> OPERATIONAL", w.total, "s")
        op.seconds.append(run.operational_s)
    suite.node_runs.append(run)
    if run.steps.get("warmup"):
        # Unlabelled: not a row of the table, a figure for bench/ready_model.py (from --json).
        suite.result("node_warmup_gbps", "", w.total).seconds.append(run.steps["warmup"])


def combine(suite: Suite, key: str, label: str, parts: list[str]) -> None:
    """A derived result whose round r is the best of ``parts`` in round r (e.g. the best buffer size)."""
    lists = [suite.results[k].seconds for k in parts if k in suite.results and suite.results[k].seconds]
    if not lists:
        return
    nbytes = suite.results[parts[0]].nbytes
    res = suite.result(key, label, nbytes)
    res.seconds = [min(ls[r] for ls in lists if len(ls) > r) for r in range(max(len(ls) for ls in lists))]


def breakdown(suite: Suite) -> list[str]:
    """Median seconds of each of the node's phases and loader steps over the rounds."""
    runs = suite.node_runs
    if not runs:
        return []
    out = []
    for what, attr in (("phases", "phases"), ("loader steps", "steps")):
        keys: dict[str, None] = {}
        for run in runs:
            keys.update(dict.fromkeys(getattr(run, attr)))
        parts = [
            f"{k} {statistics.median(getattr(run, attr).get(k, 0.0) for run in runs):.3f}"
            for k in keys
            if any(getattr(run, attr).get(k, 0.0) >= 0.0005 for run in runs)
        ]
        out.append(f"  node {what} (median s): " + ", ".join(parts))
    return out


def paired(suite: Suite, a: str, b: str) -> float | None:
    """Median over rounds of (a's GB/s / b's GB/s) in the same round: robust to a neighbour's load,
    which hits both sides of a round alike but differs between rounds."""
    sa, sb = suite.results[a].seconds, suite.results[b].seconds
    ratios = [tb / ta for ta, tb in zip(sa, sb, strict=False) if ta > 0]
    return statistics.median(ratios) if ratios else None


def report(suite: Suite, args: argparse.Namespace) -> str:
    r = suite.results
    combine(suite, "limit_read", "", ["limit_read_1M", "limit_read_8M"])
    combine(suite, "limit_xxh3", "", ["limit_xxh3_1M", "limit_xxh3_8M"])
    combine(suite, "runai_buffered", "", ["runai:sync_buffered", "runai:io_uring_buffered"])
    combine(suite, "limit_fresh", "", ["limit_fresh_anon", "limit_fresh_anon_thp", "limit_fresh_shm"])
    combine(suite, "e2e:runai", "", [f"e2e:{k}" for k in E2E_OTHERS if k.startswith("runai")])
    ours = f"ours_{streamer.DEFAULT_IMPL}"
    lines = [f"{'measurement':64s} {'best GB/s':>9s} {'median':>7s}  note", "-" * 100]
    for res in r.values():
        if not res.label or res.unit != "GB/s":
            continue
        best = f"{res.best:9.2f}" if res.best is not None else f"{'-':>9s}"
        med = f"{res.median:7.2f}" if res.median is not None else f"{'-':>7s}"
        extra = res.note
        if res.key == "prefault" and res.seconds:
            extra = f"{res.seconds[0]:.2f}s once per arena (outside the load; see README)"
        lines.append(f"{res.label:64s} {best} {med}  {extra}")
    head = f"{'end to end (what a user waits for)':64s} {'best s':>9s} {'median':>7s}  note"
    lines += ["", head, "-" * 100]
    for res in r.values():
        if not res.label or res.unit != "s":
            continue
        best = f"{min(res.seconds):9.2f}" if res.seconds else f"{'-':>9s}"
        med = f"{statistics.median(res.seconds):7.2f}" if res.seconds else f"{'-':>7s}"
        lines.append(f"{res.label:64s} {best} {med}  {res.note}")
    lines += breakdown(suite)
    targets = [
        ("node start -> READY in <= Run:ai's start -> in memory", "e2e:node", "e2e:runai", 1.0),
        ("loading phase (allocation incl.) >= 1.5x Run:ai", "ours_alloc", "runai_buffered", 1.5),
        ("loading phase (allocation incl.) >= 0.85x fresh read+xxh3", "ours_alloc", "limit_fresh", 0.85),
        ("streamer only (pre-faulted arena) >= 0.85x read+xxh3 limit", ours, "limit_xxh3", 0.85),
        ("streamer only >= 1.5x Run:ai buffered", ours, "runai_buffered", 1.5),
        ("validation >= 0.9x BLAKE3 multi-threaded", "validation", "blake3_mt", 0.9),
        ("cold load >= 0.95x cold read limit", "cold_ours", "cold_read", 0.95),
        *suite.extra_targets,
        ("(info) ours / read into the pre-faulted arena, no hash", ours, "limit_arena", 0.0),
        ("(info) python twin / cython", "ours_python", "ours_cython", 0.0),
    ]
    lines += ["", f"{'target':64s} {'best/best':>9s} {'paired':>7s}  verdict (on paired)", "-" * 100]
    for label, a, b, want in targets:
        x, y = suite.best(a), suite.best(b)
        if x is None or y is None:
            missing = b if y is None else a
            note = r[missing].note if missing in r else "not measured"
            lines.append(f"{label:64s} {'-':>9s} {'-':>7s}  not measured ({missing}: {note or 'no result'})")
            continue
        pr = paired(suite, a, b)
        verdict = "-" if pr is None else ("" if want == 0 else "ok" if pr >= want else "MISSED")
        lines.append(f"{label:64s} {x / y:9.3f} {pr if pr is not None else float('nan'):7.3f}  {verdict}")
    lines.append("")

    def ratio(a: str, b: str) -> str:
        x, y = suite.best(a), suite.best(b)
        return f"{x / y:.2f}" if x is not None and y is not None else "-"

    lines.append(
        f"other ratios (best/best): ours / read limit {ratio(ours, 'limit_read')}; ours / safetensors "
        f"load_file {ratio(ours, 'safetensors_load_file')}; pre-faulted / not {ratio(ours, 'ours_fresh')}"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="a safetensors model directory (default: generate one)")
    p.add_argument("--size-gib", type=float, default=4.0, help="size of the generated model (default 4)")
    p.add_argument("--quick", action="store_true", help="a ~256 MiB model and 3 rounds: seconds")
    p.add_argument("--repeat", type=int, default=None, help="rounds (default 5, --quick 3)")
    p.add_argument("--cold-repeat", type=int, default=2)
    p.add_argument("--no-cold", action="store_true", help="never drop the page cache")
    p.add_argument("--chunk-mib", type=int, default=8, help="streamer chunk (the loader's default: 8)")
    p.add_argument("--concurrency", type=int, default=4, help="reads in flight (the loader's default: 4)")
    p.add_argument("--skip-others", action="store_true", help="do not run the other loaders")
    p.add_argument("--skip-node", action="store_true", help="do not start a real node (end-to-end rows)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the other loaders' subprocesses")
    p.add_argument("--worker-timeout", type=float, default=900.0)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "butterfly-bench"))
    p.add_argument("--json", help="also write every measurement here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        w = workload(Path(args.model))
        print(json.dumps(worker(args.worker, Path(args.model), w.files)))
        return
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.quick:
        args.cold_repeat = 1
    suite = run(args)
    text = report(suite, args)
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    k: {"label": v.label, "bytes": v.nbytes, "seconds": v.seconds, "note": v.note}
                    for k, v in suite.results.items()
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
