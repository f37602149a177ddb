"""Chooses the seqlock implementation: the Cython one when it is built, the plain-Python twin when it
is not or when ``BUTTERFLY_PURE=1``.

This module owns the choice and a typed handle on each implementation (``SeqlockImpl``) so callers
and tests can pick one explicitly (a Cython writer against a Python reader, say). It must not contain
seqlock logic itself.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from butterfly.board import _seqlock_py
from butterfly.board._seqlock_py import ReadableBuffer, WritableBuffer

ImplName = Literal["cython", "python"]
SEQ_SIZE = _seqlock_py.SEQ_SIZE


@dataclass(frozen=True)
class SeqlockImpl:
    name: ImplName
    seq_write: Callable[[WritableBuffer, int, ReadableBuffer], None]
    seq_read: Callable[[ReadableBuffer, int, int, float], bytes]


PYTHON = SeqlockImpl("python", _seqlock_py.seq_write, _seqlock_py.seq_read)

NATIVE: SeqlockImpl | None
NATIVE_IMPORT_ERROR: ImportError | None
try:
    # importlib rather than ``from butterfly._native import board``: the extension has no stub, and
    # its functions are typed by the SeqlockImpl fields they are stored in.
    _native_board = importlib.import_module("butterfly._native.board")
except ImportError as exc:  # not built (BUTTERFLY_NO_EXT=1, or a source checkout)
    NATIVE = None
    NATIVE_IMPORT_ERROR = exc
else:
    NATIVE = SeqlockImpl("cython", _native_board.seq_write, _native_board.seq_read)
    NATIVE_IMPORT_ERROR = None


def get(name: ImplName | None = None) -> SeqlockImpl:
    """The implementation called ``name``, or the default one. Asking for "cython" when it is not
    built is an ImportError carrying the original reason."""
    if name is None:
        return DEFAULT
    if name == "python":
        return PYTHON
    if name == "cython":
        if NATIVE is None:
            raise ImportError(f"the Cython seqlock is not built: {NATIVE_IMPORT_ERROR}")
        return NATIVE
    raise ValueError(f"unknown seqlock implementation {name!r}; expected 'cython' or 'python'")


def available() -> tuple[ImplName, ...]:
    return ("cython", "python") if NATIVE is not None else ("python",)


DEFAULT: SeqlockImpl = PYTHON if NATIVE is None or os.environ.get("BUTTERFLY_PURE") == "1" else NATIVE
IMPLEMENTATION: ImplName = DEFAULT.name


def seq_write(buf: WritableBuffer, offset: int, payload: ReadableBuffer) -> None:
    """Publish ``payload`` at ``offset`` with the default implementation (see ``_seqlock_py``)."""
    DEFAULT.seq_write(buf, offset, payload)


def seq_read(buf: ReadableBuffer, offset: int, length: int, timeout_s: float = 1.0) -> bytes:
    """A consistent copy of the payload at ``offset`` with the default implementation."""
    return DEFAULT.seq_read(buf, offset, length, timeout_s)
