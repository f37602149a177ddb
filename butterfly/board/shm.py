"""POSIX shared-memory segments as files under /dev/shm, opened with os.open + mmap.

This module owns naming (``butterfly-{node_id}-{pid}-{kind}``), creating, attaching, unlinking and
the clean-up of segments left behind by a supervisor that was killed. It must not know what is inside
a segment (the board layout lives in ``layout``/``board``) and must not use
``multiprocessing.shared_memory``: its resource tracker unlinks or warns about segments that another,
unrelated process created, which is exactly the sharing we do.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import time
import warnings
from collections.abc import Iterator
from typing import Literal

SHM_DIR = "/dev/shm"
PREFIX = "butterfly-"
KINDS: tuple[str, ...] = ("board", "arena")
SegmentKind = Literal["board", "arena"]

# NAME_MAX of tmpfs; a longer name fails in open() with a less helpful ENAMETOOLONG.
_NAME_MAX = 255
# What follows "butterfly-{node_id}-": the creator's pid and the kind, nothing else.
_TAIL = re.compile(r"(?P<pid>[0-9]+)-(?P<kind>board|arena)")

_open_segments = 0

log = logging.getLogger("butterfly.shm")


def open_segment_count() -> int:
    """Segments opened by this process and not yet closed; tests assert it returns to zero."""
    return _open_segments


def _check_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid shared memory segment name {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > _NAME_MAX:
        raise ValueError(f"shared memory segment name too long ({len(name)} > {_NAME_MAX}): {name!r}")


def segment_name(node_id: str, pid: int, kind: SegmentKind) -> str:
    """The name of a segment created by supervisor ``pid`` of ``node_id``."""
    if kind not in KINDS:
        raise ValueError(f"segment kind must be one of {KINDS}, not {kind!r}")
    if pid <= 0:
        raise ValueError(f"segment pid must be positive, not {pid}")
    if not node_id:
        raise ValueError("node_id must not be empty")
    name = f"{PREFIX}{node_id}-{pid}-{kind}"
    _check_name(name)
    return name


def segment_path(name: str) -> str:
    _check_name(name)
    return os.path.join(SHM_DIR, name)


class Segment:
    """One mapped segment. Owns its mapping; ``close()`` unmaps it (the segment itself stays until
    ``unlink_segment``). The file descriptor is closed as soon as the mapping exists because
    ``mmap`` keeps its own duplicate; holding ours too would only cost a descriptor per segment."""

    def __init__(self, name: str, mapping: mmap.mmap, size: int, writable: bool) -> None:
        global _open_segments
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.size = size
        self.writable = writable
        self._mmap: mmap.mmap | None = mapping
        _open_segments += 1

    @property
    def buf(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"segment {self.name!r} is closed")
        return self._mmap

    @property
    def closed(self) -> bool:
        return self._mmap is None

    @contextlib.contextmanager
    def view(self) -> Iterator[memoryview]:
        """A memoryview of the whole mapping, released when the block ends, whatever still names it.

        Releasing explicitly is what lets ``close()`` follow: a view merely dropped lives on in any
        traceback that saw it (an exception raised by code that was handed the view keeps that
        code's frame, and with it the view, alive), and ``close()`` then raises BufferError in
        place of the real error. Slices taken of it are views of their own: release them inside the
        block too (``with view[a:b] as part``), or ``close()`` still refuses. An object still holding
        the view's buffer (``numpy.frombuffer(view)``) at the end is a bug: it is logged, and the
        mapping stays until that object is gone rather than being unmapped under it.
        """
        view = memoryview(self.buf)
        try:
            yield view
        finally:
            try:
                view.release()
            except BufferError:
                log.error("a view of shared memory %s outlived its block (a bug): not released", self.name)

    def close(self) -> None:
        """Unmap. Idempotent. Raises BufferError (and stays open) while a memoryview of it is alive,
        because unmapping under a live view would turn its next access into a segfault."""
        global _open_segments
        if self._mmap is None:
            return
        self._mmap.close()
        self._mmap = None
        _open_segments -= 1

    def resize(self, size: int) -> None:
        """Change the segment's size and this mapping's together (ftruncate + mremap): pages kept keep
        their contents and stay mapped; pages cut off are freed; new pages are zero and not faulted in.
        Raises BufferError while a memoryview of the mapping is alive (mremap may move it)."""
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        self.buf.resize(size)
        self.size = size

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            warnings.warn(f"unclosed shared memory segment {self.name!r}", ResourceWarning, stacklevel=1)
            with contextlib.suppress(Exception):
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._mmap is None else ("rw" if self.writable else "ro")
        return f"<Segment {self.name!r} size={self.size} {state}>"


def create_segment(name: str, size: int, prefault: bool = False) -> Segment:
    """Create a new segment of ``size`` zero bytes, readable and writable by this user only.

    Fails with FileExistsError if the name is taken (O_EXCL: two supervisors must never share one).
    ``prefault`` reserves the memory now (posix_fallocate) and maps it populated: tmpfs is sparse, so
    without it a full /dev/shm shows up later as SIGBUS on first touch instead of ENOSPC here.
    """
    if size <= 0:
        raise ValueError(f"segment size must be positive, not {size}")
    path = segment_path(name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        flags = mmap.MAP_SHARED
        if prefault:
            os.posix_fallocate(fd, 0, size)
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        # A half-made segment would block the next create under the same name.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)
    return Segment(name, mapping, size, writable=True)


def attach_segment(name: str, writable: bool = True) -> Segment:
    """Map an existing segment, its size taken from the file. FileNotFoundError if it is missing."""
    path = segment_path(name)
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ValueError(f"shared memory segment {name!r} is empty (its creator has not sized it)")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
    finally:
        os.close(fd)
    return Segment(name, mapping, size, writable=writable)


def unlink_segment(name: str) -> bool:
    """Remove the name (mappings stay valid until closed). False if it was already gone."""
    try:
        os.unlink(segment_path(name))
    except FileNotFoundError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        # OverflowError: a pid no kernel hands out, so nothing is running under it.
        return False
    except PermissionError:
        # Exists, owned by someone else: not ours to judge dead.
        return True
    return True


def remove_stale_segments(node_id: str) -> list[str]:
    """Unlink this node's segments whose creating pid is no longer running; return their names.

    A supervisor killed with SIGKILL cannot unlink its segments; the next start calls this. Only
    names that are exactly ``butterfly-{node_id}-{pid}-{board|arena}`` match, so another node_id
    (even one that extends this one, like ``a`` vs ``a-b``) and a live pid's segments are kept.
    A recycled pid keeps its stale segment until that pid exits; that costs memory, never data.
    """
    prefix = f"{PREFIX}{node_id}-"
    removed: list[str] = []
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in sorted(entries):
        if not entry.startswith(prefix):
            continue
        tail = _TAIL.fullmatch(entry[len(prefix) :])
        if tail is None:
            continue
        pid = int(tail["pid"])
        if pid <= 0 or _pid_alive(pid):
            continue
        if unlink_segment(entry):
            removed.append(entry)
    return removed


_ANY = re.compile(r"butterfly-(?P<id>.+)-(?P<pid>[0-9]+)-(?P<kind>board|arena)")


def remove_orphaned_segments(min_age_s: float, now_unix: float | None = None) -> list[str]:
    """Unlink every butterfly segment, whatever its node id, whose creating pid is no longer
    running and that was last written ``min_age_s`` or more ago; return their names.

    A node killed with SIGKILL and then started under another id (or never again) would otherwise
    hold its arena in /dev/shm (RAM) for good. Another id's segment may belong to a node starting
    at this moment on the same host; its creator's pid is then alive and it is kept, and the age
    guard keeps anything written recently.
    """
    now = time.time() if now_unix is None else now_unix
    removed: list[str] = []
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in sorted(entries):
        m = _ANY.fullmatch(entry)
        if m is None:
            continue
        pid = int(m["pid"])
        if pid <= 0 or _pid_alive(pid):
            continue
        try:
            age = now - os.stat(os.path.join(SHM_DIR, entry)).st_mtime
        except FileNotFoundError:
            continue
        if age >= min_age_s and unlink_segment(entry):
            removed.append(entry)
    return removed
