"""Streams byte ranges of model files into the arena, hashing every chunk with xxh3 as it lands.

Owns the public API (``ReadJob``, ``stream_into``, ``ChunkResult``, the errors), chunk planning (each
job is cut at job offsets 0, chunk_bytes, 2*chunk_bytes, ... exactly as the manifest chunks each
tensor), argument checks, the retry-once policy's error messages, and the choice of engine:

- the Cython engine (``butterfly._native.streamer``, csrc/streamer.pyx) reads from file descriptors
  on C threads with the GIL released: pread straight into the arena, xxh3 on each piece while it is
  in L2;
- the plain-Python twin ``_run_python`` does the same on Python threads (os.preadv and xxhash both
  release the GIL), and is the only engine for a ``RangeReader`` such as the S3 source, whose reads
  happen inside boto's sockets. ``BUTTERFLY_PURE=1`` makes it the default for descriptors too.

Both engines have one contract and the same tests run against both: chunks land in any order on
``concurrency`` threads; ``progress``, ``on_chunk``, ``before_retry`` and the ``cancel`` check run on
the calling thread, every ``progress_interval_s`` or sooner; a chunk whose xxh3 differs from
``expected`` is re-read from the source once, on the calling thread, and fails the stream with
``ChunkMismatch`` if it differs again; a failed or short read fails it with ``StreamReadError`` (a
``SourceError``); every thread is stopped and joined before ``stream_into`` returns or raises.

This module must not open files it was not asked to (``open_files`` is the caller's choice), write
outside the jobs' arena ranges, touch the board or the supervisor (progress goes through callbacks),
or import cupy.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import xxhash

from butterfly.weights.sources import SourceError

__all__ = [
    "Chunk",
    "ChunkMismatch",
    "ChunkResult",
    "FdTable",
    "ImplName",
    "RangeReader",
    "ReadJob",
    "StreamCancelled",
    "StreamReadError",
    "available",
    "chunk_spans",
    "open_files",
    "plan_chunks",
    "prefault",
    "stream_into",
]

ImplName = Literal["cython", "python"]
Arena = bytearray | memoryview | mmap.mmap
FdTable = Mapping[str, int]
"""File key (as named in the jobs) -> an open, readable file descriptor the caller owns."""

# Bytes per pread inside a chunk in the Cython engine: small enough to stay in a core's L2 (2 MiB here)
# until xxh3 reads it back, large enough that the syscall (~1-2 us) is a few percent of the copy.
# bench/README.md has the sweep that chose it (128-256 KiB best; from 1 MiB up the piece has left L2
# before it is hashed, and the load is a third slower).
SUB_BYTES = 256 << 10
PROGRESS_INTERVAL_S = 0.05


class RangeReader(Protocol):
    """A source that fills a buffer from a byte range (``butterfly.weights.sources``' contract): never short,
    raises SourceError, safe to call from several threads at once."""

    def read_into(self, file: str, offset: int, buf: memoryview) -> None: ...


@dataclass(frozen=True, slots=True)
class ReadJob:
    """``length`` bytes at ``file_offset`` of ``file`` go to ``arena[arena_offset:arena_offset+length]``;
    ``tensor`` names them in errors."""

    file: str
    file_offset: int
    length: int
    arena_offset: int
    tensor: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """Chunk ``index`` of job ``job``: bytes [index * chunk_bytes, + length) of that job."""

    job: int
    index: int
    tensor: str
    file: str
    file_offset: int
    arena_offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ChunkResult:
    chunk: Chunk
    xxh3: int
    """XXH3-64 (seed 0) of the chunk's bytes as they now are in the arena."""
    retried: bool
    """The first read did not match ``expected``; the re-read did."""


class StreamCancelled(Exception):
    """``cancel`` was set; chunks already in flight finished, nothing else was read."""


class StreamReadError(SourceError):
    """A read from a file descriptor failed or the file ended early; names file, tensor and offsets."""


class ChunkMismatch(Exception):
    """A chunk's bytes differed from the expected digest twice: on the first read and on the one retry."""

    def __init__(self, chunk: Chunk, expected: int, first: int, retry: int) -> None:
        self.chunk = chunk
        self.expected = expected
        self.first = first
        self.retry = retry
        end = chunk.file_offset + chunk.length
        changing = (
            "; the two reads differ, so the file changed while we read it"
            if first != retry
            else "; both reads agree, so the file is not the one the manifest describes"
        )
        super().__init__(
            f"tensor {chunk.tensor}: {chunk.file} bytes [{chunk.file_offset}, {end}) (chunk {chunk.index}, "
            f"arena offset {chunk.arena_offset}) have xxh3 {first:016x}, then {retry:016x} on the retry; "
            f"expected {expected:016x}{changing}"
        )


def chunk_spans(length: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each chunk of a ``length``-byte tensor: the manifest's chunking too."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
    return [(off, min(chunk_bytes, length - off)) for off in range(0, length, chunk_bytes)]


def plan_chunks(jobs: Sequence[ReadJob], chunk_bytes: int) -> list[Chunk]:
    return [
        Chunk(j, k, job.tensor, job.file, job.file_offset + off, job.arena_offset + off, n)
        for j, job in enumerate(jobs)
        for k, (off, n) in enumerate(chunk_spans(job.length, chunk_bytes))
    ]


@contextlib.contextmanager
def open_files(root: Path, files: Iterable[str]) -> Iterator[dict[str, int]]:
    """Open each of ``files`` (relative to ``root``) read-only for ``stream_into``; all are closed on exit."""
    fds: dict[str, int] = {}
    try:
        for f in sorted(set(files)):
            path = root / f
            try:
                fds[f] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise StreamReadError(f"cannot open {path}: {e.strerror}") from e
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


# --- engines -------------------------------------------------------------------------------------------

# (fd or -1, file_offset, arena_offset, length, expected or None): one row per chunk, as both take it.
_Row = tuple[int, int, int, int, int | None]
# (chunk index, xxh3, retried) for each chunk that landed intact since the last call, and their bytes.
_OnLanded = Callable[[list[tuple[int, int, bool]], int], None]
# None, or (kind, chunk, a, b) with kind "cancelled" | "mismatch" | "short" | "errno" (see run()).
_FailureTuple = tuple[str, int, int, int]


class _Engine(Protocol):
    def __call__(
        self,
        arena: Arena,
        chunks: list[_Row],
        concurrency: int,
        sub_bytes: int,
        on_landed: _OnLanded,
        cancelled: Callable[[], bool] | None,
        before_retry: Callable[[int], None] | None,
        interval_s: float,
    ) -> _FailureTuple | None: ...


class _ShortRead(Exception):
    def __init__(self, got: int) -> None:
        self.got = got


class _ReadFailed(Exception):
    """An OSError from pread, with how many bytes of the chunk had arrived."""

    def __init__(self, err: int, got: int) -> None:
        self.err = err
        self.got = got


def _pread_fully(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    want = len(view)
    while got < want:
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except InterruptedError:
            continue
        except OSError as e:
            raise _ReadFailed(e.errno or 0, got) from e
        if n == 0:
            raise _ShortRead(got)
        got += n


class _PyStream:
    """The twin's shared state; every field below ``cv`` is guarded by it, like ``bf_stream``'s."""

    def __init__(self, n: int) -> None:
        self.cv = threading.Condition(threading.Lock())
        self.next_claim = 0
        self.landed: list[int] = []
        self.events = 0
        self.stop = False
        # Per chunk, written by the thread that read it until the index is logged in ``landed``. A failed
        # pread is kept as numbers, not as the exception: its traceback would hold a view of the arena.
        self.digest = [0] * n
        self.io_failure: list[_FailureTuple | None] = [None] * n
        self.error: list[Exception | None] = [None] * n


def _run_python(
    arena: Arena,
    chunks: list[_Row],
    concurrency: int,
    sub_bytes: int,
    on_landed: _OnLanded,
    cancelled: Callable[[], bool] | None,
    before_retry: Callable[[int], None] | None,
    interval_s: float,
    *,
    reader: Callable[[int, memoryview], None] | None = None,
) -> _FailureTuple | None:
    """The plain-Python engine, line for line the algorithm of ``run`` in csrc/streamer.pyx.

    ``reader(chunk, view)`` fills ``view`` with chunk ``chunk``; by default it is a pread of the chunk's
    row. Returns the same failure tuples, except that an exception from a ``reader`` (the S3 source's
    SourceError, say) is re-raised as it is, once every thread is joined: it names its range itself."""
    del sub_bytes  # the twin reads a chunk in one preadv: Python-level piecing would only add overhead
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    if not 0.0 < interval_s <= 3600.0:
        raise ValueError(f"interval_s must be in (0, 3600], not {interval_s}")
    n = len(chunks)
    if n == 0:
        return None
    mv = memoryview(arena).cast("B")
    try:
        if mv.readonly or not mv.c_contiguous:
            raise ValueError("arena must be a C-contiguous writable buffer")
        for k, (fd, file_offset, arena_offset, length, _) in enumerate(chunks):
            if (
                fd < -1
                or file_offset < 0
                or arena_offset < 0
                or length <= 0
                or arena_offset + length > len(mv)
            ):
                raise ValueError(
                    f"chunk {k} (fd {fd}, file offset {file_offset}, arena [{arena_offset}, "
                    f"{arena_offset} + {length})) is invalid for an arena of {len(mv)} bytes"
                )
        st = _PyStream(n)

        def read_hash(i: int) -> str:
            """Read chunk i and hash it; "ok", "mismatch" or "failed" (cause in st.io_failure/error[i])."""
            fd, file_offset, arena_offset, length, expected = chunks[i]
            with mv[arena_offset : arena_offset + length] as view:
                try:
                    if reader is None:
                        _pread_fully(fd, view, file_offset)
                    else:
                        reader(i, view)
                except _ShortRead as e:
                    st.io_failure[i] = ("short", i, e.got, 0)
                    return "failed"
                except _ReadFailed as e:
                    st.io_failure[i] = ("errno", i, e.err, e.got)
                    return "failed"
                except Exception as e:
                    st.error[i] = e
                    return "failed"
                st.digest[i] = xxhash.xxh3_64_intdigest(view)
            return "mismatch" if expected is not None and st.digest[i] != expected else "ok"

        status = [""] * n

        def worker() -> None:
            while True:
                with st.cv:
                    if st.stop or st.next_claim >= n:
                        return
                    i = st.next_claim
                    st.next_claim += 1
                s = read_hash(i)
                with st.cv:
                    status[i] = s
                    st.landed.append(i)
                    if s == "failed":
                        st.stop = True
                    if s != "ok" or len(st.landed) == n:
                        st.events += 1
                        st.cv.notify()

        def io_failure(i: int) -> _FailureTuple:
            failure, error = st.io_failure[i], st.error[i]
            if error is not None:
                raise error
            assert failure is not None
            return failure

        threads = [
            threading.Thread(target=worker, name=f"streamer-{k}", daemon=True)
            for k in range(min(concurrency, n))
        ]
        started: list[threading.Thread] = []
        try:
            for t in threads:
                t.start()
                started.append(t)
            seen = 0
            events_seen = 0
            while seen < n:
                deadline = time.monotonic() + interval_s
                with st.cv:
                    while st.events == events_seen and len(st.landed) < n:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        st.cv.wait(left)
                    now_landed = len(st.landed)
                    events_seen = st.events
                batch: list[tuple[int, int, bool]] = []
                nbytes = 0
                failure: _FailureTuple | None = None
                while seen < now_landed:
                    i = st.landed[seen]
                    seen += 1
                    if status[i] == "ok":
                        batch.append((i, st.digest[i], False))
                        nbytes += chunks[i][3]
                        continue
                    if status[i] != "mismatch":
                        failure = io_failure(i)
                        break
                    # Chunk i has landed: no worker touches it again, so this thread may re-read it.
                    first = st.digest[i]
                    if before_retry is not None:
                        before_retry(i)
                    status[i] = read_hash(i)
                    if status[i] == "ok":
                        batch.append((i, st.digest[i], True))
                        nbytes += chunks[i][3]
                    elif status[i] == "mismatch":
                        failure = ("mismatch", i, first, st.digest[i])
                        break
                    else:
                        failure = io_failure(i)
                        break
                if batch:
                    on_landed(batch, nbytes)
                if failure is not None:
                    return failure
                if seen < n and cancelled is not None and cancelled():
                    return ("cancelled", -1, 0, 0)
            return None
        finally:
            with st.cv:
                st.stop = True
            for t in started:
                t.join()
    finally:
        mv.release()


NATIVE: _Engine | None
NATIVE_IMPORT_ERROR: ImportError | None
_native_prefault: Callable[[Arena], str] | None
try:
    # importlib rather than a from-import: the extension has no stub; its functions are typed by the
    # variables they are stored in.
    _native = importlib.import_module("butterfly._native.streamer")
except ImportError as exc:  # not built (BUTTERFLY_NO_EXT=1, or a source checkout)
    NATIVE = None
    NATIVE_IMPORT_ERROR = exc
    _native_prefault = None
else:
    NATIVE = _native.run
    NATIVE_IMPORT_ERROR = None
    _native_prefault = _native.prefault

DEFAULT_IMPL: ImplName = "python" if NATIVE is None or os.environ.get("BUTTERFLY_PURE") == "1" else "cython"


def available() -> tuple[ImplName, ...]:
    return ("cython", "python") if NATIVE is not None else ("python",)


def _engine(name: ImplName | None, fds: bool) -> _Engine:
    """The engine for ``name`` (None: the default for this kind of reader)."""
    if name is None:
        name = DEFAULT_IMPL if fds else "python"
    if name == "python":
        return _run_python
    if name != "cython":
        raise ValueError(f"unknown streamer implementation {name!r}; expected 'cython' or 'python'")
    if NATIVE is None:
        raise ImportError(f"the Cython streamer is not built: {NATIVE_IMPORT_ERROR}")
    if not fds:
        raise ValueError("the Cython streamer reads file descriptors only; a RangeReader needs impl='python'")
    return NATIVE


def prefault(arena: Arena, impl: ImplName | None = None) -> str:
    """Fault every page of ``arena`` in, writable, without changing its bytes; returns how
    ("populate_write", "touch"). Call it before streaming into an arena that was not created with
    ``create_segment(..., prefault=True)``: first-touch faults during the load cost several times the
    copy. Not while another thread writes to ``arena``."""
    if (impl or DEFAULT_IMPL) == "cython" and _native_prefault is not None:
        return _native_prefault(arena)
    with memoryview(arena).cast("B") as mv:
        if mv.readonly:
            raise ValueError("arena must be writable")
        page = mmap.PAGESIZE
        for off in range(0, len(mv), page):
            mv[off] = mv[off]
    return "touch"


def _check_jobs(jobs: Sequence[ReadJob], arena_len: int) -> None:
    spans = []
    for j in jobs:
        if j.length < 0 or j.file_offset < 0 or j.arena_offset < 0:
            raise ValueError(f"job for tensor {j.tensor} has a negative offset or length: {j}")
        if j.arena_offset + j.length > arena_len:
            raise ValueError(
                f"tensor {j.tensor} needs arena [{j.arena_offset}, {j.arena_offset + j.length}), "
                f"past the arena's {arena_len} bytes"
            )
        if j.length:
            spans.append((j.arena_offset, j.length, j.tensor))
    spans.sort()
    for (a, n, t), (b, _, u) in zip(spans, spans[1:], strict=False):
        # Two readers writing the same bytes would race, and both digests would be meaningless.
        if a + n > b:
            raise ValueError(f"tensors {t} and {u} overlap in the arena at offset {b}")


def _check_files(jobs: Sequence[ReadJob], fds: FdTable) -> None:
    ends: dict[str, tuple[int, str]] = {}
    for j in jobs:
        if j.file not in fds:
            raise ValueError(f"tensor {j.tensor} is in {j.file}, which has no file descriptor")
        end = j.file_offset + j.length
        if end > ends.get(j.file, (-1, ""))[0]:
            ends[j.file] = (end, j.tensor)
    for f, (end, tensor) in ends.items():
        size = os.fstat(fds[f]).st_size
        if size < end:
            raise StreamReadError(
                f"{f} is {size} bytes but tensor {tensor} ends at byte {end}: the file is truncated "
                "or is not the one the layout was read from"
            )


def _check_expected(jobs: Sequence[ReadJob], expected: Sequence[Sequence[int]], chunk_bytes: int) -> None:
    if len(expected) != len(jobs):
        raise ValueError(f"expected has digests for {len(expected)} jobs, but there are {len(jobs)} jobs")
    for j, digests in zip(jobs, expected, strict=True):
        want = -(-j.length // chunk_bytes)
        if len(digests) != want:
            raise ValueError(
                f"tensor {j.tensor}: {len(digests)} expected digests, but {j.length} bytes in chunks of "
                f"{chunk_bytes} make {want}"
            )


def stream_into(
    jobs: Sequence[ReadJob],
    arena: Arena,
    reader: FdTable | RangeReader,
    *,
    chunk_bytes: int,
    concurrency: int = 4,
    expected: Sequence[Sequence[int]] | None = None,
    progress: Callable[[int], None] | None = None,
    on_chunk: Callable[[ChunkResult], None] | None = None,
    before_retry: Callable[[Chunk], None] | None = None,
    cancel: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    impl: ImplName | None = None,
) -> list[ChunkResult]:
    """Read every job into ``arena`` in chunks of ``chunk_bytes``, ``concurrency`` reads in flight, and
    return one ``ChunkResult`` per chunk in job order, then chunk order.

    ``reader`` is an ``FdTable`` (the fast path: the Cython engine unless ``impl='python'``) or a
    ``RangeReader`` (always the Python engine). ``expected[j][k]`` is the xxh3 chunk k of job j must
    have. ``progress(nbytes)`` gets the bytes of chunks that landed intact since its last call; the
    calls add up to the jobs' total exactly when the stream succeeds. ``on_chunk`` gets each landed
    chunk (to start its upload, say), ``before_retry`` each chunk about to be re-read. ``tick()`` is
    called every ``progress_interval_s`` or sooner whether or not anything landed, so a caller can prove
    it is alive (a heartbeat) while one slow chunk trickles in. All callbacks run on this thread; an
    exception from one stops the stream and propagates.

    Raises ChunkMismatch, StreamReadError (short file, I/O error), the reader's own SourceError,
    StreamCancelled, or ValueError for jobs that overlap, leave the arena or disagree with ``expected``.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, not {concurrency}")
    fds: FdTable | None = reader if isinstance(reader, Mapping) else None
    engine = _engine(impl, fds is not None)
    with memoryview(arena) as probe:
        arena_len = probe.nbytes
    _check_jobs(jobs, arena_len)
    if expected is not None:
        _check_expected(jobs, expected, chunk_bytes)
    if fds is not None:
        _check_files(jobs, fds)
    plan = plan_chunks(jobs, chunk_bytes)
    flat_expected: list[int | None] = (
        [d for digests in expected for d in digests] if expected is not None else [None] * len(plan)
    )
    rows: list[_Row] = [
        (fds[c.file] if fds is not None else -1, c.file_offset, c.arena_offset, c.length, e)
        for c, e in zip(plan, flat_expected, strict=True)
    ]
    if cancel is not None and cancel.is_set():
        raise StreamCancelled("cancelled before the first read")

    results: list[ChunkResult | None] = [None] * len(plan)

    def landed(batch: list[tuple[int, int, bool]], nbytes: int) -> None:
        for i, digest, retried in batch:
            r = ChunkResult(plan[i], digest, retried)
            results[i] = r
            if on_chunk is not None:
                on_chunk(r)
        if progress is not None:
            progress(nbytes)

    retry_hook = None if before_retry is None else (lambda i: before_retry(plan[i]))
    cancelled = _poller(cancel, tick)
    if fds is None:
        source = reader
        assert not isinstance(source, Mapping)

        def read(i: int, view: memoryview) -> None:
            source.read_into(plan[i].file, plan[i].file_offset, view)

        failure = _run_python(
            arena,
            rows,
            concurrency,
            SUB_BYTES,
            landed,
            cancelled,
            retry_hook,
            progress_interval_s,
            reader=read,
        )
    else:
        failure = engine(
            arena, rows, concurrency, SUB_BYTES, landed, cancelled, retry_hook, progress_interval_s
        )
    if failure is not None:
        _raise(failure, plan, flat_expected)
    out = [r for r in results if r is not None]
    if len(out) != len(plan):  # an engine bug, never a user error: refuse to return a partial arena
        raise AssertionError(f"streamer engine reported {len(out)} of {len(plan)} chunks")
    return out


def _poller(cancel: threading.Event | None, tick: Callable[[], None] | None) -> Callable[[], bool] | None:
    """What the engines poll between waits (every interval or event): ``tick`` first, then ``cancel``."""
    if tick is None:
        return None if cancel is None else cancel.is_set

    def poll() -> bool:
        tick()
        return cancel is not None and cancel.is_set()

    return poll


def _raise(failure: _FailureTuple, plan: Sequence[Chunk], expected: Sequence[int | None]) -> None:
    kind, i, a, b = failure
    if kind == "cancelled":
        raise StreamCancelled("cancelled: chunks in flight finished, nothing further was read")
    c = plan[i]
    end = c.file_offset + c.length
    where = f"tensor {c.tensor}: {c.file} bytes [{c.file_offset}, {end}) (arena offset {c.arena_offset})"
    if kind == "mismatch":
        e = expected[i]
        assert e is not None
        raise ChunkMismatch(c, e, a, b)
    if kind == "short":
        raise StreamReadError(
            f"{where}: the file ended at byte {c.file_offset + a}, {c.length - a} bytes short"
        )
    if kind == "errno":
        raise StreamReadError(f"{where}: read failed at byte {c.file_offset + b}: {os.strerror(a)}")
    raise AssertionError(f"unknown streamer failure {failure!r}")
