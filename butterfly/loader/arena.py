"""The loader's arena: the shared-memory segment that will hold this node's weights, made ready to write.

Owns: creating the segment (``butterfly.board.shm`` names and maps it) and faulting every page of it
in, writable, before the stream writes there: a first touch inside the stream's copy costs several
times the copy (bench/README.md). The pages are faulted on every core at once, in pieces, and the
calling thread beats between pieces, so a 100 GB arena is never mistaken for a hung loader. Memory
the machine does not have is an ``ArenaError`` here, not a SIGBUS in the middle of the load.

Must not: know about tensors, sources or manifests, or write a byte of the arena (faulting reads and
writes back nothing: ``MADV_POPULATE_WRITE`` leaves the zeroes the kernel gave).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from butterfly.board.shm import Segment, attach_segment, create_segment, segment_path, unlink_segment
from butterfly.supervisor.childproc import HEARTBEAT_S
from butterfly.weights import streamer

__all__ = ["ARENA_ALIGN", "ArenaError", "EarlyArena", "allocate", "populate", "reserve"]

log = logging.getLogger("butterfly.loader")

# Every tensor's place in the arena is aligned to this (vectorised reads).
ARENA_ALIGN = 64
MADV_POPULATE_WRITE = 23  # Linux >= 5.14
MADV_HUGEPAGE = 14
# Bytes faulted per call: big enough that the call's overhead vanishes, small enough that the caller
# beats often (~20-60 ms per piece at this machine's 1-3 GB/s fault rate) and the cores share the work
# evenly. A multiple of 2 MiB, so a huge page is never split between two pieces.
PIECE_BYTES = 64 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


class ArenaError(Exception):
    """The arena could not be made: no memory (or no room in /dev/shm) for it."""


def _populate_piece(addr: int, length: int, cancel: threading.Event | None = None) -> int:
    """madvise(MADV_POPULATE_WRITE) one piece; 0 or the errno. ctypes drops the GIL for the call."""
    if cancel is not None and cancel.is_set():
        return errno.ECANCELED
    if _libc.madvise(addr, length, MADV_POPULATE_WRITE) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def _each_piece(
    work: Callable[[int, int], int],
    size: int,
    threads: int | None,
    beat: Callable[[], None],
    start: int = 0,
) -> set[int]:
    """``work(offset, length)`` on every PIECE_BYTES piece of [start, size) on ``threads`` threads
    (default: one per core), ``beat`` on this thread every HEARTBEAT_S or sooner; the errnos the pieces
    returned, 0 left out. A piece that saw the cancel returns ECANCELED: ``ArenaError`` here."""
    threads = max(1, threads or len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(threads, thread_name_prefix="arena") as pool:
        futures = [
            pool.submit(work, off, min(PIECE_BYTES, size - off)) for off in range(start, size, PIECE_BYTES)
        ]
        pending = set(futures)
        while pending:
            beat()
            _, pending = wait(pending, timeout=HEARTBEAT_S)
        errs = {f.result() for f in futures} - {0}
    if errno.ECANCELED in errs:
        raise ArenaError("making the arena was cancelled")
    return errs


def populate(
    seg: Segment,
    beat: Callable[[], None],
    threads: int | None = None,
    start: int = 0,
    cancel: threading.Event | None = None,
) -> str:
    """Fault every page of ``seg`` from byte ``start`` on in, writable, on ``threads`` threads (default:
    one per core), calling ``beat`` on this thread every HEARTBEAT_S or sooner; returns how
    ("populate_write" or "touch"). ``cancel`` set stops it between pieces with an ``ArenaError``.

    Huge pages are asked for first (MADV_HUGEPAGE): where the kernel gives them to shared memory
    (``shmem_enabled=advise``, or the arena on a tmpfs mounted with ``huge=``), a 2 MiB fault replaces
    512 small ones; elsewhere the advice is ignored."""
    size = seg.size
    with contextlib.suppress(OSError):
        seg.buf.madvise(MADV_HUGEPAGE)
    anchor = ctypes.c_char.from_buffer(seg.buf)  # an export of the mapping: it cannot be unmapped meanwhile
    try:
        base = ctypes.addressof(anchor)
        errs = _each_piece(
            lambda off, n: _populate_piece(base + off, n, cancel),
            size,
            threads,
            beat,
            start - start % PIECE_BYTES,
        )
    finally:
        del anchor
    if not errs:
        return "populate_write"
    if errs == {errno.EINVAL}:
        return _touch(seg, beat)  # a kernel older than 5.14
    err = min(errs)
    raise ArenaError(
        f"cannot fault in {size} bytes of shared memory for the arena ({os.strerror(err)}): "
        f"{'/dev/shm is full or ' if err == errno.EFAULT else ''}the machine lacks the memory"
    )


def _touch(seg: Segment, beat: Callable[[], None]) -> str:
    """The old-kernel fallback: reserve the memory (ENOSPC now rather than SIGBUS later), then write each
    page's first byte back to itself, a piece at a time."""
    fd = os.open(segment_path(seg.name), os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, seg.size)
    except OSError as e:
        msg = f"cannot reserve {seg.size} bytes of shared memory for the arena: {e.strerror}"
        raise ArenaError(msg) from e
    finally:
        os.close(fd)
    with memoryview(seg.buf) as mv:
        for off in range(0, seg.size, PIECE_BYTES):
            beat()
            with mv[off : off + PIECE_BYTES] as piece:
                streamer.prefault(piece)
    return "touch"


def allocate(
    name: str,
    size: int,
    beat: Callable[[], None],
    threads: int | None = None,
    cancel: threading.Event | None = None,
) -> Segment:
    """A new segment ``name`` of ``size`` bytes with every page faulted in (see ``populate``)."""
    seg = create_segment(name, size)
    try:
        how = populate(seg, beat, threads, cancel=cancel)
    except BaseException:
        seg.close()
        with contextlib.suppress(OSError):
            unlink_segment(name)
        raise
    log.debug("arena %s: %d bytes faulted in (%s)", name, size, how)
    return seg


def _reserve_piece(fd: int, off: int, length: int, cancel: threading.Event | None) -> int:
    if cancel is not None and cancel.is_set():
        return errno.ECANCELED
    try:
        os.posix_fallocate(fd, off, length)  # drops the GIL
    except OSError as e:
        return e.errno or errno.EIO
    return 0


def reserve(name: str, size: int, threads: int | None = None, cancel: threading.Event | None = None) -> None:
    """A new segment file ``name`` of ``size`` bytes whose pages are allocated (posix_fallocate, a piece
    at a time on ``threads`` threads) and mapped by no one: what a process that will not use the arena
    does for the one that will (``EarlyArena(hand_over=True)``). Against mapping it, faulting it in
    and unmapping it, this skips two passes over a page table entry per 4 KiB page: for 4 GiB here,
    1.2 s and 1.7 CPU-seconds instead of 1.9 s and 3.3, for 0.2 s more in the adopter's own fault-in
    (bench/README.md). No memory for it: ``ArenaError``, and no file left."""
    path = segment_path(name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        errs = _each_piece(lambda off, n: _reserve_piece(fd, off, n, cancel), size, threads, lambda: None)
        if errs:
            err = min(errs)
            raise ArenaError(
                f"cannot reserve {size} bytes of shared memory for the arena ({os.strerror(err)}): "
                f"{'/dev/shm is full or ' if err == errno.ENOSPC else ''}the machine lacks the memory"
            )
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


class EarlyArena:
    """An arena made before the plan, on a helper thread, while discovery and election run: the
    manifest and this node's capacity give its likely size before the coordinator says which layers
    are ours. ``take(size)`` then resizes it to the real size (mremap keeps the faulted pages; a
    larger arena faults only its new tail), or returns None if it could not be made.

    Two processes share the work at a node's start (``butterfly.loader.prewarm``): the supervisor
    makes the arena first, ``hand_over``: it only ``reserve``s the file's pages, never mapping them;
    the first loader ``adopt``s it: it maps the file and faults in whatever is not there yet (pages
    already there cost a page-table entry), or makes the arena itself if there is none."""

    def __init__(
        self,
        name: str,
        size: Callable[[], int | None],
        threads: int | None = None,
        *,
        adopt: bool = False,
        hand_over: bool = False,
    ) -> None:
        """Start making arena ``name`` of ``size()`` bytes (worked out on the helper thread too: it may
        read the manifest from the source); ``size()`` None or 0 means "do not make one"."""
        self.name = name
        self.size = 0
        self.seg: Segment | None = None
        self.error: BaseException | str | None = None
        self.seconds = 0.0
        self.adopted = False
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._make, args=(size, threads, adopt, hand_over), name="early-arena", daemon=True
        )
        self._thread.start()

    def _make(
        self, size: Callable[[], int | None], threads: int | None, adopt: bool, hand_over: bool
    ) -> None:
        t0 = time.monotonic()
        try:
            self.size = size() or 0
            if self.size <= 0:
                self.error = "no size estimate"
                return
            if hand_over:
                reserve(self.name, self.size, threads, self._cancel)
                return
            seg = self._adopt(threads) if adopt else None
            self.seg = seg or allocate(self.name, self.size, lambda: None, threads, self._cancel)
        except BaseException as e:  # reported by take(); the load then allocates as usual
            self.error = e
        finally:
            self.seconds = time.monotonic() - t0

    def _adopt(self, threads: int | None) -> Segment | None:
        """The arena another process made under this name, sized and faulted in; None if there is none."""
        try:
            seg = attach_segment(self.name, writable=True)
        except (FileNotFoundError, ValueError):  # none, or one still being created: make our own
            with contextlib.suppress(OSError):
                unlink_segment(self.name)
            return None
        try:
            if seg.size != self.size:
                seg.resize(self.size)
            populate(seg, lambda: None, threads, cancel=self._cancel)
        except BaseException:
            seg.close()
            raise
        self.adopted = True
        return seg

    def cancel(self) -> None:
        """Stop making it (between pieces): a made arena's name is then the caller's to unlink, one not
        yet made is never made."""
        self._cancel.set()

    def wait(self, beat: Callable[[], None], timeout_s: float | None = None) -> bool:
        """Until it is made (or failed), beating meanwhile; False if ``timeout_s`` passed first (its size
        may come from a store that does not answer: a stopping node does not wait for that)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._thread.is_alive():
            beat()
            left = HEARTBEAT_S if deadline is None else min(HEARTBEAT_S, deadline - time.monotonic())
            if left <= 0:
                return False
            self._thread.join(left)
        return True

    def take(self, size: int, beat: Callable[[], None]) -> Segment | None:
        """The arena resized to ``size`` and faulted in; None if the early one failed (logged)."""
        self.wait(beat)
        seg, self.seg = self.seg, None
        if seg is None:
            log.info("early arena of %d bytes was not made (%s): allocating now", self.size, self.error)
            return None
        old = seg.size
        seg.resize(size)
        if size > old:
            populate(seg, beat, start=old)
        log.info(
            "arena made before the plan%s: %d bytes in %.3fs, resized to %d",
            " (begun by the supervisor)" if self.adopted else "",
            old,
            self.seconds,
            size,
        )
        return seg

    def discard(self, beat: Callable[[], None]) -> None:
        self.wait(beat)
        if self.seg is not None:
            self.seg.close()
            self.seg = None
        with contextlib.suppress(OSError):
            unlink_segment(self.name)
