"""Plain-Python twin of the Cython seqlock in ``csrc/board.pyx``: same functions, checks, errors and
byte format, built from memoryview + struct.

Layout at ``offset``: a native u64 sequence counter (8-byte aligned; little-endian on the machines we
run on), then the payload. A writer makes the counter odd, copies the payload, makes it even again; a
reader copies the payload between two reads of an equal, even counter, else retries.

Why no fences here: on x86-64 (TSO) stores become visible in program order and loads are not
reordered with other loads, and each step below is a separate call into the interpreter, which the
C compiler cannot reorder across. The counter is read and written with the *native* ``"Q"`` struct
code because that is one 8-byte memcpy (a single aligned load or store, so never seen half-written);
the standard ``"<Q"`` code packs byte by byte. On weakly ordered CPUs (ARM) this twin is not a
correct seqlock across processes; use the Cython one there.

It must not hold the buffer beyond a call: every view is released before returning, so the owner
can close its mmap.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import operator
import os
import struct
import sys
import time

from butterfly.board.errors import TornSectionError

# Any object exporting a C-contiguous buffer; the named types are the ones the board uses.
ReadableBuffer = bytes | bytearray | memoryview | mmap.mmap
WritableBuffer = bytearray | memoryview | mmap.mmap

SEQ_SIZE = 8
SEQ_ALIGN = 8
_MASK = (1 << 64) - 1
# Spins (re-reads) before giving the CPU away: a writer copies a few hundred bytes, so a short
# spin usually outlasts it; past that the writer is probably descheduled and we let it run.
SPINS_BEFORE_YIELD = 128

_SEQ = struct.Struct("Q")
if _SEQ.size != SEQ_SIZE or sys.byteorder != "little":
    raise ImportError("the board's byte format needs a little-endian platform with an 8-byte u64")


class _PyBuffer(ctypes.Structure):
    # CPython's Py_buffer, stable since 3.0; only ``buf`` is read.
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(view: memoryview) -> int:
    """The memory address of a contiguous byte view. The alignment rule is about real addresses
    (a bytearray whose head was deleted starts mid-word), and plain Python has no other way to ask."""
    info = _PyBuffer()
    _get_buffer(view, ctypes.byref(info), 0)  # PyBUF_SIMPLE; raises on failure (pythonapi)
    try:
        return info.buf or 0
    finally:
        _release_buffer(ctypes.byref(info))


def _check_timeout(timeout_s: float) -> float:
    timeout = float(timeout_s)
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout_s must be >= 0, not {timeout_s!r}")
    return timeout


def _check_span(view: memoryview, offset: int, length: int) -> None:
    """Bounds and alignment of [offset, offset + 8 + length) in ``view``; ValueError otherwise."""
    if offset < 0 or length < 0 or offset + SEQ_SIZE + length > view.nbytes:
        size = view.nbytes
        raise ValueError(
            f"section [{offset}, {offset} + {SEQ_SIZE} + {length}) is outside the buffer of {size} bytes"
        )
    if (_address(view) + offset) % SEQ_ALIGN:
        raise ValueError(f"sequence counter at offset {offset} is not {SEQ_ALIGN}-byte aligned in memory")


def _byte_view(obj: object, what: str, writable: bool) -> memoryview:
    view = memoryview(obj)  # type: ignore[arg-type]  # TypeError for non-buffers, as in Cython
    try:
        if not view.c_contiguous:
            raise ValueError(f"{what} must be a C-contiguous buffer")
        if writable and view.readonly:
            raise ValueError(f"{what} is read-only")
        return view.cast("B")
    finally:
        view.release()


def seq_write(buf: WritableBuffer, offset: int, payload: ReadableBuffer) -> None:
    """Publish ``payload`` in the section at ``offset``. Only one writer per section, ever."""
    offset = operator.index(offset)
    with _byte_view(payload, "payload", writable=False) as data, _byte_view(buf, "buffer", True) as mv:
        _check_span(mv, offset, data.nbytes)
        start = offset + SEQ_SIZE
        seq = _SEQ.unpack_from(mv, offset)[0]
        # Odd even if the last writer died mid-write (seq already odd): readers see it change.
        odd = (seq + 2 if seq & 1 else seq + 1) & _MASK
        _SEQ.pack_into(mv, offset, odd)
        mv[start : start + data.nbytes] = data
        _SEQ.pack_into(mv, offset, (odd + 1) & _MASK)


def seq_read(buf: ReadableBuffer, offset: int, length: int, timeout_s: float = 1.0) -> bytes:
    """A consistent copy of the ``length``-byte payload at ``offset``; TornSectionError if none could
    be taken within ``timeout_s`` (one attempt is always made)."""
    offset = operator.index(offset)
    length = operator.index(length)
    timeout = _check_timeout(timeout_s)
    with _byte_view(buf, "buffer", writable=False) as mv:
        _check_span(mv, offset, length)
        start = offset + SEQ_SIZE
        deadline = -1.0
        spins = 0
        while True:
            seq = _SEQ.unpack_from(mv, offset)[0]
            if not seq & 1:
                data = bytes(mv[start : start + length])
                if _SEQ.unpack_from(mv, offset)[0] == seq:
                    return data
            # The clock is only read once a first attempt failed: the common read never pays for it.
            now = time.monotonic()
            if deadline < 0:
                deadline = now + timeout
            if now >= deadline:
                raise TornSectionError(offset, seq, timeout)
            spins += 1
            if spins >= SPINS_BEFORE_YIELD:
                os.sched_yield()
