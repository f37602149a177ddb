# cython: language_level=3, boundscheck=False, wraparound=False
"""Native seqlock for the status board: ``seq_write`` and ``seq_read`` over any contiguous buffer.

This module owns argument checking (types, bounds, alignment, contiguity) and the GIL handling around
the C seqlock in ``seqlock.h``; its semantics, errors and byte format are exactly those of the plain
twin ``butterfly/board/_seqlock_py.py`` and the same tests run against both. It must not know the
board layout and must not keep a buffer beyond a call (the owner closes its mmap).
"""

from cpython.buffer cimport (
    PyBUF_RECORDS_RO,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.math cimport isnan
from libc.stdint cimport uint64_t, uintptr_t

import operator


cdef extern from "seqlock.h" nogil:
    size_t BF_SEQ_SIZE
    void bf_seq_write(unsigned char *section, const unsigned char *payload, size_t length)
    int bf_seq_read(const unsigned char *section, unsigned char *out, size_t length,
                    double timeout_s, uint64_t *last_seq)


# The counter is a u64 read and written with single atomic instructions, which needs natural alignment.
cdef enum:
    _SEQ_ALIGN = 8

SEQ_SIZE = BF_SEQ_SIZE
SEQ_ALIGN = _SEQ_ALIGN


cdef int _acquire(object obj, Py_buffer *view, bint writable, str what) except -1:
    """Export ``obj``'s buffer into ``view`` or raise as the Python twin does. While exported, an
    mmap cannot be closed and a bytearray cannot be resized, so the pointer stays valid through
    the nogil sections below."""
    PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO)
    if not PyBuffer_IsContiguous(view, b'C'):
        PyBuffer_Release(view)
        raise ValueError(f"{what} must be a C-contiguous buffer")
    if writable and view.readonly:
        PyBuffer_Release(view)
        raise ValueError(f"{what} is read-only")
    return 0


cdef int _check_span(Py_buffer *view, object offset, object length) except -1:
    # Python ints here, so a huge offset is a ValueError (as in the twin), not an OverflowError.
    if offset < 0 or length < 0 or offset + SEQ_SIZE + length > view.len:
        span = f"[{offset}, {offset} + {SEQ_SIZE} + {length})"
        raise ValueError(f"section {span} is outside the buffer of {view.len} bytes")
    # offset <= view.len here, so the cast to size_t is exact.
    if (<uintptr_t>view.buf + <size_t>offset) % _SEQ_ALIGN:
        raise ValueError(f"sequence counter at offset {offset} is not {SEQ_ALIGN}-byte aligned in memory")
    return 0


cdef double _check_timeout(object timeout_s) except -1.0:
    cdef double timeout = float(timeout_s)
    if isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout_s must be >= 0, not {timeout_s!r}")
    return timeout


def seq_write(buf, offset, payload):
    """Publish ``payload`` in the section at ``offset``. Only one writer per section, ever."""
    cdef Py_buffer target
    cdef Py_buffer data
    cdef unsigned char *section
    cdef size_t length
    offset = operator.index(offset)
    _acquire(payload, &data, False, "payload")
    try:
        _acquire(buf, &target, True, "buffer")
        try:
            _check_span(&target, offset, data.len)
            # In bounds: _check_span proved offset + 8 + data.len <= target.len, and both buffers
            # stay exported (pinned) until the finally clauses below.
            section = <unsigned char *>target.buf + <size_t>offset
            length = <size_t>data.len
            # nogil: the copy may be large and other threads (the HTTP API) must keep running.
            with nogil:
                bf_seq_write(section, <const unsigned char *>data.buf, length)
        finally:
            PyBuffer_Release(&target)
    finally:
        PyBuffer_Release(&data)


def seq_read(buf, offset, length, timeout_s=1.0):
    """A consistent copy of the ``length``-byte payload at ``offset``; TornSectionError if none could
    be taken within ``timeout_s`` (one attempt is always made)."""
    cdef Py_buffer source
    cdef const unsigned char *section
    cdef unsigned char *out
    cdef size_t n
    cdef double timeout
    cdef uint64_t last_seq = 0
    cdef int rc
    cdef bytes result
    offset = operator.index(offset)
    length = operator.index(length)
    timeout = _check_timeout(timeout_s)
    _acquire(buf, &source, False, "buffer")
    try:
        _check_span(&source, offset, length)
        n = <size_t>length
        # A fresh bytes object no one else can see yet, so filling it in place is safe; it is
        # exactly ``n`` bytes long.
        result = PyBytes_FromStringAndSize(NULL, n)
        out = <unsigned char *>PyBytes_AS_STRING(result)
        # In bounds: _check_span proved offset + 8 + n <= source.len; the export pins the buffer.
        section = <const unsigned char *>source.buf + <size_t>offset
        # nogil: spinning on a section whose writer is descheduled must not stall other threads.
        with nogil:
            rc = bf_seq_read(section, out, n, timeout, &last_seq)
    finally:
        PyBuffer_Release(&source)
    if rc != 0:
        # Imported here, not at module level: importing butterfly.board.errors runs
        # butterfly/board/__init__, which imports this module; at the top that is a cycle when
        # this extension is the first thing imported.
        from butterfly.board.errors import TornSectionError
        raise TornSectionError(offset, last_seq, timeout)
    return result
