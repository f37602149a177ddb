"""Errors raised by the status board and its shared-memory segments.

This module owns the exception types only; both seqlock implementations (Cython and plain Python)
raise the same ``TornSectionError`` built here, so their messages and attributes are identical.
It must not import anything else from the package, so that it can be imported from anywhere
(the Cython module imports it lazily, on its error path) without a cycle.
"""

from __future__ import annotations


class BoardError(Exception):
    """Base class of everything the board raises on purpose."""


class TornSectionError(BoardError):
    """No consistent copy of a section could be read within the timeout.

    Either the sequence counter stayed odd (its writer died in the middle of a write, or is stuck),
    or it kept changing on every attempt. ``seq`` is the last value seen; an odd one points at a
    dead writer. A restarted writer repairs the section with its next write.
    """

    def __init__(self, offset: int, seq: int, timeout_s: float, where: str = "") -> None:
        self.offset = offset
        self.seq = seq
        self.timeout_s = timeout_s
        self.where = where
        if seq & 1:
            why = f"sequence stayed odd ({seq}): its writer died or stalled mid-write"
        else:
            why = f"sequence kept changing (last {seq}): the writer never paused long enough"
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}no consistent read of the section at offset {offset} within {timeout_s:g}s; {why}"
        )

    def __reduce__(self) -> tuple[type[TornSectionError], tuple[int, int, float, str]]:
        # Keep the error picklable across multiprocessing (the default reduce passes only the message).
        return (TornSectionError, (self.offset, self.seq, self.timeout_s, self.where))


class BoardAttachError(BoardError):
    """A segment exists but is not a board this code can read (wrong magic, version or size)."""

    def __init__(self, segment: str, reason: str) -> None:
        self.segment = segment
        self.reason = reason
        super().__init__(f"cannot attach status board {segment!r}: {reason}")

    def __reduce__(self) -> tuple[type[BoardAttachError], tuple[str, str]]:
        return (BoardAttachError, (self.segment, self.reason))
