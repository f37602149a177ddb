"""The streamer: every test that streams runs once per engine (the Cython one and its Python twin);
and, at the end, the validator's multi-threaded BLAKE3 (butterfly.weights.hashing).

An autouse fixture checks that no test leaves a file descriptor open or a thread running; tests that
stream into an mmap close it afterwards, which fails while any view of it is still exported.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import xxhash

from butterfly.weights import hashing, streamer
from butterfly.weights.hashing import RegionPart, Span
from butterfly.weights.sources import FilesystemSource, SourceError
from butterfly.weights.streamer import (
    Chunk,
    ChunkMismatch,
    ChunkResult,
    ImplName,
    ReadJob,
    StreamCancelled,
    StreamReadError,
    chunk_spans,
    open_files,
    plan_chunks,
    stream_into,
)

IMPL_NAMES: list[ImplName] = ["cython", "python"]
REPO = Path(__file__).resolve().parent.parent
FILE_BYTES = (3 << 20) + 4099
SENTINEL = 0xA5


@pytest.fixture(params=IMPL_NAMES)
def impl(request: pytest.FixtureRequest) -> ImplName:
    name: ImplName = request.param
    if name == "cython" and streamer.NATIVE is None:
        if os.environ.get("BUTTERFLY_NO_EXT"):
            pytest.skip("BUTTERFLY_NO_EXT=1: the Cython streamer is not built")
        pytest.fail(
            "the Cython streamer is not built (run `python setup.py build_ext --inplace`): "
            f"{streamer.NATIVE_IMPORT_ERROR}"
        )
    return name


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _tasks() -> int:
    # C reader threads do not show up in threading.enumerate(); /proc lists every kernel thread.
    return len(os.listdir("/proc/self/task"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    fds, tasks, threads = _open_fds(), _tasks(), threading.active_count()
    yield
    assert _open_fds() - fds == set(), "a test left a file descriptor open"
    assert threading.active_count() == threads, "a test left a Python thread running"
    # A joined Python thread's kernel task may take a moment to exit after join() returns; C threads
    # are joined with pthread_join and are gone at once. Wait a little, never assert on time.
    deadline = time.monotonic() + 5.0
    while _tasks() > tasks and time.monotonic() < deadline:
        time.sleep(0.001)
    assert _tasks() == tasks, "a test left a thread running"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("streamer")
    (d / "a.bin").write_bytes(random.Random(1).randbytes(FILE_BYTES))
    (d / "b.bin").write_bytes(random.Random(2).randbytes(FILE_BYTES // 3))
    return d


@pytest.fixture
def files(data_dir: Path) -> Iterator[dict[str, int]]:
    with open_files(data_dir, ["a.bin", "b.bin"]) as fds:
        yield fds


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A private copy of a.bin for tests that change the file under the streamer."""
    f = tmp_path / "a.bin"
    f.write_bytes(random.Random(1).randbytes(FILE_BYTES))
    return f


def _digests(data: bytes, job: ReadJob, chunk_bytes: int) -> list[int]:
    body = data[job.file_offset : job.file_offset + job.length]
    return [xxhash.xxh3_64_intdigest(body[o : o + n]) for o, n in chunk_spans(job.length, chunk_bytes)]


def _random_jobs(rng: random.Random, sizes: dict[str, int]) -> tuple[list[ReadJob], int]:
    """Jobs at random file ranges, placed in the arena in a random order with random gaps."""
    jobs = []
    for k in range(rng.randint(1, 12)):
        f = rng.choice(sorted(sizes))
        length = rng.choice([0, 1, rng.randint(1, 4096), rng.randint(1, sizes[f] // 2)])
        jobs.append((f, rng.randint(0, sizes[f] - length), length, f"t{k}"))
    rng.shuffle(jobs)
    placed, off = [], 0
    for f, file_off, length, name in jobs:
        off += rng.choice([0, 1, 63, 4096])
        placed.append(ReadJob(f, file_off, length, off, name))
        off += length
    return placed, off + rng.choice([0, 7])


def test_random_jobs_land_byte_exact(impl: ImplName, data_dir: Path, files: dict[str, int]) -> None:
    data = {f: (data_dir / f).read_bytes() for f in files}
    rng = random.Random(42)
    for case in range(24):
        jobs, size = _random_jobs(rng, {f: len(b) for f, b in data.items()})
        total = sum(j.length for j in jobs)
        # Tiny chunks only where they stay few: a chunk costs a syscall (and a Python call in the twin).
        chunk_bytes = rng.choice([1, 3, 4096] if total < 20_000 else [4096 + 3, 65537, 1 << 20])
        concurrency = rng.randint(1, 8)
        arena = bytearray([SENTINEL]) * size
        got = stream_into(jobs, arena, files, chunk_bytes=chunk_bytes, concurrency=concurrency, impl=impl)
        expect = bytearray([SENTINEL]) * size
        for j in jobs:
            expect[j.arena_offset : j.arena_offset + j.length] = data[j.file][
                j.file_offset : j.file_offset + j.length
            ]
        assert arena == expect, f"case {case}: arena differs (chunk {chunk_bytes}, concurrency {concurrency})"
        assert [r.chunk for r in got] == plan_chunks(jobs, chunk_bytes)
        assert [r.xxh3 for r in got] == [d for j in jobs for d in _digests(data[j.file], j, chunk_bytes)]
        assert not any(r.retried for r in got)


def test_chunks_follow_the_manifest_chunking() -> None:
    assert chunk_spans(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert chunk_spans(8, 4) == [(0, 4), (4, 4)]
    assert chunk_spans(0, 4) == []
    jobs = [ReadJob("f", 100, 10, 64, "x"), ReadJob("g", 0, 0, 0, "empty"), ReadJob("g", 5, 4, 0, "y")]
    assert plan_chunks(jobs, 4) == [
        Chunk(0, 0, "x", "f", 100, 64, 4),
        Chunk(0, 1, "x", "f", 104, 68, 4),
        Chunk(0, 2, "x", "f", 108, 72, 2),
        Chunk(2, 0, "y", "g", 5, 0, 4),
    ]


def test_expected_digests_that_match_pass(impl: ImplName, data_dir: Path, files: dict[str, int]) -> None:
    data = (data_dir / "a.bin").read_bytes()
    jobs = [ReadJob("a.bin", 1000, 300_001, 0, "w1"), ReadJob("a.bin", 0, 0, 300_001, "empty")]
    expected = [_digests(data, jobs[0], 65536), []]
    arena = bytearray(300_001)
    retries: list[Chunk] = []
    got = stream_into(
        jobs, arena, files, chunk_bytes=65536, expected=expected, before_retry=retries.append, impl=impl
    )
    assert arena == data[1000:301_001]
    assert [r.xxh3 for r in got] == expected[0] and not retries


def test_wrong_digest_is_retried_once_then_named(
    impl: ImplName, data_dir: Path, files: dict[str, int]
) -> None:
    data = (data_dir / "a.bin").read_bytes()
    job = ReadJob("a.bin", 4096, 200_000, 128, "model.layers.3.mlp.up_proj.weight")
    expected = [_digests(data, job, 65536)]
    expected[0][2] ^= 1
    retries: list[Chunk] = []
    with pytest.raises(ChunkMismatch) as info:
        stream_into(
            [job], bytearray(200_128), files, chunk_bytes=65536, expected=expected,
            before_retry=retries.append, impl=impl,
        )  # fmt: skip
    chunk = Chunk(0, 2, job.tensor, "a.bin", 4096 + 2 * 65536, 128 + 2 * 65536, 65536)
    assert retries == [chunk]
    e = info.value
    assert e.chunk == chunk and e.first == e.retry == expected[0][2] ^ 1 and e.expected == expected[0][2]
    msg = str(e)
    for part in (
        job.tensor,
        "a.bin",
        f"[{chunk.file_offset}, {chunk.file_offset + 65536})",
        "arena offset 131200",
    ):
        assert part in msg
    assert "not the one the manifest describes" in msg


def test_corrupt_first_read_recovers_on_retry(impl: ImplName, scratch: Path) -> None:
    good = scratch.read_bytes()
    job = ReadJob("a.bin", 0, 1 << 20, 0, "emb")
    expected = [_digests(good, job, 1 << 18)]
    with open(scratch, "r+b") as f:
        f.seek(300_000)
        f.write(bytes([good[300_000] ^ 0xFF]))

    def repair(chunk: Chunk) -> None:
        with open(scratch, "r+b") as f:
            f.seek(300_000)
            f.write(good[300_000:300_001])

    progress: list[int] = []
    with open_files(scratch.parent, ["a.bin"]) as fds:
        arena = bytearray(1 << 20)
        got = stream_into(
            [job], arena, fds, chunk_bytes=1 << 18, expected=expected, before_retry=repair,
            progress=progress.append, impl=impl,
        )  # fmt: skip
    assert arena == good[: 1 << 20]
    assert [r.retried for r in got] == [False, True, False, False]
    assert sum(progress) == 1 << 20


def test_file_changing_between_read_and_retry_is_caught(impl: ImplName, scratch: Path) -> None:
    good = scratch.read_bytes()
    job = ReadJob("a.bin", 0, 1 << 20, 0, "lm_head.weight")
    expected = [_digests(good, job, 1 << 18)]

    def flip(at: int) -> None:
        with open(scratch, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))

    flip(600_000)  # the first read sees this ...
    with open_files(scratch.parent, ["a.bin"]) as fds, pytest.raises(ChunkMismatch) as info:
        # ... and the retry sees another byte flipped as well.
        stream_into(
            [job], bytearray(1 << 20), fds, chunk_bytes=1 << 18, expected=expected,
            before_retry=lambda c: flip(600_001), impl=impl,
        )  # fmt: skip
    e = info.value
    assert e.chunk.index == 2 and e.first != e.retry and e.expected not in (e.first, e.retry)
    assert "changed while we read it" in str(e)


def test_file_truncated_before_retry_is_a_read_error(impl: ImplName, scratch: Path) -> None:
    job = ReadJob("a.bin", 0, 1 << 20, 0, "norm.weight")
    expected = [_digests(scratch.read_bytes(), job, 1 << 18)]
    expected[0][3] ^= 1
    with (
        open_files(scratch.parent, ["a.bin"]) as fds,
        pytest.raises(StreamReadError, match="ended at byte 800000"),
    ):
        stream_into(
            [job], bytearray(1 << 20), fds, chunk_bytes=1 << 18, expected=expected,
            before_retry=lambda c: os.truncate(scratch, 800_000), impl=impl,
        )  # fmt: skip


def test_short_file_is_a_clear_error_before_any_read(impl: ImplName, files: dict[str, int]) -> None:
    size = FILE_BYTES // 3
    job = ReadJob("b.bin", size - 10, 20, 0, "model.norm.weight")
    with pytest.raises(
        StreamReadError, match=rf"b\.bin is {size} bytes but tensor model\.norm\.weight ends at"
    ):
        stream_into([job], bytearray(20), files, chunk_bytes=8, impl=impl)


def test_progress_is_exact_and_on_the_calling_thread(
    impl: ImplName, data_dir: Path, files: dict[str, int]
) -> None:
    jobs = [ReadJob("a.bin", 0, 2_000_000, 0, "x"), ReadJob("b.bin", 17, 999_999, 2_000_000, "y")]
    me = threading.get_ident()
    progress: list[int] = []
    callers: set[int] = set()
    chunks: list[ChunkResult] = []

    def on_progress(n: int) -> None:
        callers.add(threading.get_ident())
        progress.append(n)

    def on_chunk(r: ChunkResult) -> None:
        callers.add(threading.get_ident())
        chunks.append(r)

    got = stream_into(
        jobs, bytearray(3_000_000), files, chunk_bytes=100_000, concurrency=3, progress=on_progress,
        on_chunk=on_chunk, progress_interval_s=0.001, impl=impl,
    )  # fmt: skip
    assert sum(progress) == 2_999_999 and all(n > 0 for n in progress)
    assert callers == {me}
    assert sorted(chunks, key=lambda r: (r.chunk.job, r.chunk.index)) == got


def test_cancel_mid_stream_stops_promptly(impl: ImplName, data_dir: Path, files: dict[str, int]) -> None:
    """Set on the first landed chunk: at most the chunks already landed or in flight follow. The file is
    read 64 bytes at a time on one thread, ~50k syscalls, far longer than the first progress wake-up."""
    cancel = threading.Event()
    landed: list[ChunkResult] = []

    def on_chunk(r: ChunkResult) -> None:
        landed.append(r)
        cancel.set()

    jobs = [ReadJob("a.bin", 0, FILE_BYTES, 0, "big")]
    progress: list[int] = []
    with pytest.raises(StreamCancelled):
        stream_into(
            jobs, bytearray(FILE_BYTES), files, chunk_bytes=64, concurrency=1, cancel=cancel,
            on_chunk=on_chunk, progress=progress.append, progress_interval_s=0.001, impl=impl,
        )  # fmt: skip
    assert 0 < len(landed) < FILE_BYTES // 64
    assert sum(progress) == 64 * len(landed)


def test_cancel_stops_claiming_new_chunks(data_dir: Path) -> None:
    """With a reader that blocks until released, exactly the chunks in flight finish after the cancel."""
    cancel = threading.Event()
    gate = threading.Event()
    calls: list[int] = []
    lock = threading.Lock()
    source = FilesystemSource(data_dir)

    class Gated:
        def read_into(self, file: str, offset: int, buf: memoryview) -> None:
            with lock:
                calls.append(offset)
            if offset >= 2 * 1024:
                assert gate.wait(10)
            source.read_into(file, offset, buf)

    def on_chunk(r: ChunkResult) -> None:
        if len(calls) >= 2 + 3:  # chunks 0 and 1, and one blocked chunk per reader thread
            cancel.set()
            gate.set()

    try:
        with pytest.raises(StreamCancelled):
            stream_into(
                [ReadJob("a.bin", 0, 64 * 1024, 0, "t")], bytearray(64 * 1024), Gated(), chunk_bytes=1024,
                concurrency=3, cancel=cancel, on_chunk=on_chunk, progress_interval_s=0.001,
            )  # fmt: skip
    finally:
        gate.set()
        source.close()
    assert len(calls) <= 2 + 3 + 3  # at most one more claim per thread between its chunk and the cancel


def test_tick_is_called_while_a_slow_chunk_has_not_landed(data_dir: Path) -> None:
    """A chunk that takes many intervals to arrive: tick keeps coming (the loader's heartbeat rides on
    it), while progress waits for bytes that landed."""
    source = FilesystemSource(data_dir)
    ticks: list[float] = []
    progress: list[int] = []

    class Slow:
        def read_into(self, file: str, offset: int, buf: memoryview) -> None:
            time.sleep(0.3)
            source.read_into(file, offset, buf)

    try:
        stream_into(
            [ReadJob("a.bin", 0, 1024, 0, "t")], bytearray(1024), Slow(), chunk_bytes=1024,
            tick=lambda: ticks.append(time.monotonic()), progress=progress.append, progress_interval_s=0.01,
        )  # fmt: skip
    finally:
        source.close()
    assert progress == [1024]
    assert len(ticks) >= 5  # ~30 intervals passed; a loaded machine may run a few of them late


def test_cancel_before_start_reads_nothing(impl: ImplName, files: dict[str, int]) -> None:
    cancel = threading.Event()
    cancel.set()
    arena = bytearray(100)
    with pytest.raises(StreamCancelled):
        stream_into(
            [ReadJob("a.bin", 0, 100, 0, "t")], arena, files, chunk_bytes=10, cancel=cancel, impl=impl
        )
    assert arena == bytearray(100)


@pytest.mark.parametrize("failure", ["ok", "mismatch", "cancel", "callback"])
def test_mmap_arena_is_released_whatever_happens(
    impl: ImplName, data_dir: Path, files: dict[str, int], failure: str
) -> None:
    data = (data_dir / "a.bin").read_bytes()
    job = ReadJob("a.bin", 0, 1 << 20, 4096, "t")
    expected = [_digests(data, job, 1 << 16)]
    if failure == "mismatch":
        expected[0][5] ^= 1
    cancel = threading.Event()

    def on_progress(n: int) -> None:
        if failure == "cancel":
            cancel.set()
        if failure == "callback":
            raise KeyError("boom")

    arena = mmap.mmap(-1, (1 << 20) + 4096)
    try:
        streamer.prefault(arena, impl=impl)
        try:
            stream_into(
                [job], arena, files, chunk_bytes=1 << 16, expected=expected, cancel=cancel,
                progress=on_progress, impl=impl,
            )  # fmt: skip
        except (ChunkMismatch, StreamCancelled, KeyError) as e:
            assert failure != "ok", e
        else:
            assert failure in ("ok", "cancel")  # a cancel may come after the last chunk landed
            assert arena[4096:] == data[: 1 << 20]
    finally:
        arena.close()  # BufferError if the streamer left a view exported


def test_reader_source_uses_the_python_engine(data_dir: Path) -> None:
    data = (data_dir / "a.bin").read_bytes()
    source = FilesystemSource(data_dir)
    try:
        job = ReadJob("a.bin", 3, 500_000, 1, "t")
        arena = bytearray(500_001)
        got = stream_into(
            [job], arena, source, chunk_bytes=65536, concurrency=4, expected=[_digests(data, job, 65536)]
        )
        assert arena[1:] == data[3:500_003] and len(got) == 8
        with pytest.raises(ValueError, match="RangeReader needs impl='python'"):
            stream_into([job], arena, source, chunk_bytes=65536, impl="cython")
    finally:
        source.close()


def test_reader_errors_propagate_unchanged(data_dir: Path) -> None:
    class Failing:
        def read_into(self, file: str, offset: int, buf: memoryview) -> None:
            if offset >= 4:
                raise SourceError(f"s3://bucket/{file} range {offset}: 500 after 3 retries")
            buf[:] = b"\0" * len(buf)

    arena = mmap.mmap(-1, 64)
    try:
        with pytest.raises(SourceError, match="500 after 3 retries"):
            stream_into([ReadJob("k", 0, 64, 0, "t")], arena, Failing(), chunk_bytes=4, concurrency=2)
    finally:
        arena.close()


@pytest.mark.parametrize(
    ("jobs", "arena_len", "kwargs", "message"),
    [
        ([ReadJob("a.bin", 0, 10, 0, "x"), ReadJob("a.bin", 0, 10, 9, "y")], 20, {}, "x and y overlap"),
        ([ReadJob("a.bin", 0, 10, 5, "x")], 14, {}, r"needs arena \[5, 15\)"),
        ([ReadJob("a.bin", -1, 10, 0, "x")], 14, {}, "negative"),
        ([ReadJob("c.bin", 0, 10, 0, "x")], 14, {}, "c.bin, which has no file descriptor"),
        ([ReadJob("a.bin", 0, 10, 0, "x")], 10, {"expected": [[1, 2]]}, "2 expected digests"),
        ([ReadJob("a.bin", 0, 10, 0, "x")], 10, {"expected": []}, "for 0 jobs"),
        ([ReadJob("a.bin", 0, 10, 0, "x")], 10, {"chunk_bytes": 0}, "chunk_bytes"),
        ([ReadJob("a.bin", 0, 10, 0, "x")], 10, {"concurrency": 0}, "concurrency"),
    ],
)
def test_bad_arguments_are_refused(
    impl: ImplName,
    files: dict[str, int],
    jobs: list[ReadJob],
    arena_len: int,
    kwargs: dict[str, object],
    message: str,
) -> None:
    args: dict[str, object] = {"chunk_bytes": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        stream_into(jobs, bytearray(arena_len), files, impl=impl, **args)  # type: ignore[arg-type]


def test_read_only_arena_is_refused(impl: ImplName, files: dict[str, int]) -> None:
    with pytest.raises((ValueError, TypeError, BufferError)):
        stream_into([ReadJob("a.bin", 0, 4, 0, "x")], memoryview(bytes(4)), files, chunk_bytes=4, impl=impl)


def test_open_files_closes_and_names_missing_files(data_dir: Path) -> None:
    with open_files(data_dir, ["a.bin", "a.bin", "b.bin"]) as fds:
        assert sorted(fds) == ["a.bin", "b.bin"]
    with pytest.raises(StreamReadError, match="nope.bin"), open_files(data_dir, ["a.bin", "nope.bin"]):
        pass


def test_prefault_keeps_contents(impl: ImplName) -> None:
    arena = mmap.mmap(-1, 3 * mmap.PAGESIZE + 5)
    try:
        arena[:] = random.Random(3).randbytes(len(arena))
        before = arena[:]
        assert streamer.prefault(arena, impl=impl) in ("populate_write", "touch")
        assert arena[:] == before
        with memoryview(arena)[100:] as tail:
            streamer.prefault(tail, impl=impl)
        assert arena[:] == before
    finally:
        arena.close()


def test_vendored_xxh3_matches_the_xxhash_package() -> None:
    if streamer.NATIVE is None:
        pytest.skip("the Cython streamer is not built")
    from butterfly._native import streamer as native  # type: ignore[attr-defined]

    rng = random.Random(7)
    for n in [0, 1, 3, 4, 8, 16, 17, 128, 129, 240, 241, 1023, 1024, 65_536 + 3, 1 << 20]:
        b = rng.randbytes(n)
        assert native.xxh3_64(b) == xxhash.xxh3_64_intdigest(b), n


def test_pure_env_selects_the_twin() -> None:
    code = "from butterfly.weights import streamer; print(streamer.DEFAULT_IMPL)"
    env = {**os.environ, "BUTTERFLY_PURE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "python"


# --- validation hashing (butterfly.weights.hashing): the validator's multi-threaded BLAKE3 -----------


def _random_regions(rng: random.Random, size: int) -> list[list[RegionPart]]:
    regions: list[list[RegionPart]] = []
    for _ in range(rng.randint(0, 12)):
        parts: list[RegionPart] = []
        for _ in range(rng.randint(0, 4)):
            if rng.random() < 0.3:
                parts.append(rng.randbytes(rng.randint(0, 40)))
            else:
                off = rng.randint(0, size)
                parts.append(Span(off, rng.randint(0, size - off)))
        regions.append(parts)
    return regions


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("mt_min", [1, hashing.MT_MIN_BYTES])
def test_blake3_regions_equal_blake3_of_the_concatenation(
    threads: int, mt_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hashing, "MT_MIN_BYTES", mt_min)  # 1: big regions take the rayon path too
    rng = random.Random(threads * 1000 + mt_min)
    arena = mmap.mmap(-1, 1 << 20)
    try:
        arena[:] = rng.randbytes(1 << 20)
        for _ in range(10):
            regions = _random_regions(rng, 1 << 20)
            got = hashing.blake3_regions(arena, regions, threads)
            want = [
                blake3.blake3(
                    b"".join(p if isinstance(p, bytes) else arena[p.offset : p.offset + p.length] for p in r)
                ).digest()
                for r in regions
            ]
            assert got == want
    finally:
        arena.close()  # BufferError if a view of it outlived the call


def test_blake3_regions_reproduce_the_validators_unit_framing() -> None:
    buf = random.Random(4).randbytes(10_000)
    tensors = [("b.weight", 100, 3000), ("a.weight", 5000, 4000)]
    h = blake3.blake3()
    for name, off, length in sorted(tensors):
        h.update(name.encode() + b"\0" + length.to_bytes(8, "little"))
        h.update(buf[off : off + length])
    region: list[RegionPart] = []
    for name, off, length in sorted(tensors):
        region += [name.encode() + b"\0" + length.to_bytes(8, "little"), Span(off, length)]
    assert hashing.blake3_regions(buf, [region], threads=2) == [h.digest()]
    assert hashing.region_bytes(region) == 7000


def test_blake3_regions_refuse_spans_outside_the_buffer() -> None:
    for span in (Span(0, 11), Span(11, 0), Span(-1, 1), Span(3, -1)):
        with pytest.raises(ValueError, match="outside the buffer of 10 bytes"):
            hashing.blake3_regions(bytes(10), [[Span(0, 1)], [span]], threads=2)
    with pytest.raises(ValueError, match="threads"):
        hashing.blake3_regions(bytes(10), [], threads=0)
    assert hashing.blake3_regions(bytes(10), [], threads=2) == []
    assert hashing.blake3_regions(bytes(10), [[]], threads=2) == [blake3.blake3().digest()]
