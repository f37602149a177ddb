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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from butterfly.board.shm import Segment, create_segment, segment_path, unlink_segment
from butterfly.loader import streamer
from butterfly.supervisor.childproc import HEARTBEAT_S

__all__ = ["ArenaError", "allocate", "populate"]

log = logging.getLogger("butterfly.loader")

MADV_POPULATE_WRITE = 23  # Linux >= 5.14
# Bytes faulted per call: big enough that the call's overhead vanishes, small enough that the caller
# beats often (~20-60 ms per piece at this machine's 1-3 GB/s fault rate) and the cores share the work
# evenly. A multiple of 2 MiB, so a huge page is never split between two pieces.
PIECE_BYTES = 64 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


class ArenaError(Exception):
    """The arena could not be made: no memory (or no room in /dev/shm) for it."""


def _populate_piece(addr: int, length: int) -> int:
    """madvise(MADV_POPULATE_WRITE) one piece; 0 or the errno. ctypes drops the GIL for the call."""
    if _libc.madvise(addr, length, MADV_POPULATE_WRITE) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def populate(seg: Segment, beat: Callable[[], None], threads: int | None = None) -> str:
    """Fault every page of ``seg`` in, writable, on ``threads`` threads (default: one per core), calling
    ``beat`` on this thread every HEARTBEAT_S or sooner; returns how ("populate_write" or "touch")."""
    threads = max(1, threads or len(os.sched_getaffinity(0)))
    size = seg.size
    pieces = [(off, min(PIECE_BYTES, size - off)) for off in range(0, size, PIECE_BYTES)]
    anchor = ctypes.c_char.from_buffer(seg.buf)  # an export of the mapping: it cannot be unmapped meanwhile
    try:
        base = ctypes.addressof(anchor)
        with ThreadPoolExecutor(threads, thread_name_prefix="arena") as pool:
            futures = [pool.submit(_populate_piece, base + off, n) for off, n in pieces]
            pending = set(futures)
            while pending:
                beat()
                _, pending = wait(pending, timeout=HEARTBEAT_S)
            errs = {f.result() for f in futures} - {0}
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


def allocate(name: str, size: int, beat: Callable[[], None], threads: int | None = None) -> Segment:
    """A new segment ``name`` of ``size`` bytes with every page faulted in (see ``populate``)."""
    seg = create_segment(name, size)
    try:
        how = populate(seg, beat, threads)
    except BaseException:
        seg.close()
        with contextlib.suppress(OSError):
            unlink_segment(name)
        raise
    log.debug("arena %s: %d bytes faulted in (%s)", name, size, how)
    return seg
