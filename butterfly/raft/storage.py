"""Durable storage of one node's Raft hard state and log: an append-only, fsync'd record file.

This module owns the file format and its crash recovery. It must not interpret Raft beyond what keeps
the file honest (entries contiguous, committed entries never truncated), and it never decides what to
write: the driver hands it each :class:`~butterfly.raft.core.Ready` and sends that Ready's messages
only after :meth:`RaftStorage.save` has returned.

Format: an 8-byte magic, then records. A record is ``length (u32 BE) | crc (u32 BE) | payload`` where
the crc is zlib.crc32 over the length bytes and the payload, and the payload is one msgpack
:class:`SaveRecord`. One ``save()`` is one record written with one ``write`` and an ``fsync``, so a
Ready's hard state and entries become durable together or not at all. A record whose entries start at or
below the stored last index is the truncation record: on replay the stored suffix from
``truncate_from`` on is dropped before its entries are appended (a follower's conflicting entries).

Recovery on open: a bad record that is the last thing in the file (its claimed end is past EOF, or
everything from it to EOF is zero bytes, or its crc fails and no valid record follows) is a write torn
by a crash; it was never acknowledged, so it is cut off and the file fsync'd. A bad record followed by a
valid one is corruption of durable data: :class:`StorageCorrupt` names the file and offset, and the node
must not start. Log compaction and snapshots are out of scope; :meth:`RaftStorage.compact` only rewrites
the file as one record of the live state to drop superseded hard-state records.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import msgspec

from butterfly.raft.core import PersistedState, Ready
from butterfly.raft.messages import Entry, HardState

MAGIC = b"BFRAFT\x00\x01"
_HEADER = struct.Struct(">II")
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""Largest payload accepted on read; a length above it is treated as damage, not allocated."""


class StorageError(Exception):
    """The storage cannot be used (bad magic, locked by another process, a failed write)."""


class StorageCorrupt(StorageError):
    """Durable data in the middle of the file does not verify; carries where."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt record at offset {offset}: {reason}")
        self.path = path
        self.offset = offset


class SaveRecord(msgspec.Struct, frozen=True, array_like=True):
    """One ``save()``: the new hard state (if any), and entries replacing the log from ``truncate_from``
    (0 when they only append)."""

    hard_state: HardState | None
    truncate_from: int
    entries: tuple[Entry, ...]


_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[SaveRecord] = msgspec.msgpack.Decoder(SaveRecord)


def _frame(record: SaveRecord) -> bytes:
    payload = _encoder.encode(record)
    length = struct.pack(">I", len(payload))
    return length + struct.pack(">I", zlib.crc32(payload, zlib.crc32(length))) + payload


def _record_at(data: bytes | memoryview, offset: int) -> tuple[int, bytes] | str:
    """(end offset, payload) of a verified record at ``offset``, or why it does not verify."""
    if len(data) - offset < _HEADER.size:
        return "truncated header"
    length, crc = _HEADER.unpack_from(data, offset)
    if length == 0 or length > MAX_RECORD_BYTES:
        return f"bad length {length}"
    end = offset + _HEADER.size + length
    if end > len(data):
        return f"length {length} runs past end of file"
    payload = bytes(data[offset + _HEADER.size : end])
    if zlib.crc32(payload, zlib.crc32(bytes(data[offset : offset + 4]))) != crc:
        return "crc mismatch"
    return end, payload


def _is_torn_tail(data: bytes, offset: int) -> bool:
    """A crash can leave a prefix of the last write, or zeroes from block preallocation; it cannot
    leave a verifiable record after the damage. So: torn iff no valid record starts after ``offset``."""
    if not any(data[offset:]):
        return True
    view = memoryview(data)
    return all(isinstance(_record_at(view, p), str) for p in range(offset + 1, len(data) - _HEADER.size + 1))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RaftStorage:
    """The Raft state of one node in one file, locked against a second process.

    Open with :meth:`open`; :meth:`load` gives what survived; :meth:`save` / :meth:`save_ready` return
    only after the data is fsync'd. After any write error the object refuses further use: after a
    failed fsync the kernel may have dropped the dirty pages, so a retry could report success for data
    that is gone. Restart the node and let recovery decide.
    """

    def __init__(self, path: Path, fd: int, hard: HardState | None, entries: list[Entry], torn: int) -> None:
        self._path = path
        self._fd: int | None = fd
        self._hard = hard
        self._entries = entries
        self._broken = False
        self.recovered_torn_bytes = torn
        """Bytes cut off the end of the file on open (a write torn by a crash); 0 normally."""

    @classmethod
    def open(cls, path: Path | str) -> RaftStorage:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageError(f"{path}: locked by another process") from None
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
            torn = 0
            if len(data) < len(MAGIC) and MAGIC.startswith(data):
                # Empty, or a crash while writing the header: no record can exist yet.
                torn = len(data)
                os.ftruncate(fd, 0)
                os.pwrite(fd, MAGIC, 0)
                os.fsync(fd)
                _fsync_dir(path.parent)
                data = MAGIC
            hard, entries, valid_end = cls._replay(path, data)
            torn += len(data) - valid_end
            if valid_end < len(data):
                os.ftruncate(fd, valid_end)
                os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, hard, entries, torn)

    @staticmethod
    def _replay(path: Path, data: bytes) -> tuple[HardState | None, list[Entry], int]:
        if data[: len(MAGIC)] != MAGIC:
            raise StorageError(f"{path}: not a Butterfly Raft log (bad magic)")
        hard: HardState | None = None
        entries: list[Entry] = []
        offset = len(MAGIC)
        view = memoryview(data)
        while offset < len(data):
            found = _record_at(view, offset)
            if isinstance(found, str):
                if _is_torn_tail(data, offset):
                    return hard, entries, offset
                raise StorageCorrupt(path, offset, found)
            end, payload = found
            try:
                record = _decoder.decode(payload)
                _check(record, hard, len(entries))
            except (msgspec.DecodeError, ValueError) as exc:
                # The crc matched, so these bytes are what we wrote: a writer bug, never a torn write.
                raise StorageCorrupt(path, offset, str(exc)) from exc
            hard = _apply(record, hard, entries)
            offset = end
        return hard, entries, offset

    # -- reading -------------------------------------------------------------------------------------

    def load(self) -> PersistedState | None:
        """The persisted state, or None if nothing was ever saved (a fresh node)."""
        if self._hard is None and not self._entries:
            return None
        return PersistedState(hard_state=self._hard or HardState(), entries=tuple(self._entries))

    @property
    def path(self) -> Path:
        return self._path

    @property
    def last_index(self) -> int:
        return len(self._entries)

    def file_size(self) -> int:
        return os.fstat(self._require_fd()).st_size

    # -- writing -------------------------------------------------------------------------------------

    def save_ready(self, ready: Ready) -> None:
        """Persist the durable part of ``ready``; its messages may be sent when this returns."""
        self.save(ready.hard_state, ready.entries)

    def save(self, hard_state: HardState | None, entries: Sequence[Entry]) -> None:
        """Durably record ``hard_state`` (None: unchanged) and ``entries`` (replacing stored entries
        from ``entries[0].index`` on) as one record, fsync'd before returning."""
        if hard_state is None and not entries:
            return
        entries = tuple(entries)
        truncate_from = entries[0].index if entries and entries[0].index <= len(self._entries) else 0
        record = SaveRecord(hard_state=hard_state, truncate_from=truncate_from, entries=entries)
        _check(record, self._hard, len(self._entries))
        self._write(_frame(record))
        self._hard = _apply(record, self._hard, self._entries)

    def compact(self) -> None:
        """Rewrite the file as a single record of the live state (write temp, fsync, rename, fsync dir)."""
        fd = self._require_fd()
        tmp = self._path.with_name(self._path.name + ".compact")
        record = SaveRecord(hard_state=self._hard, truncate_from=0, entries=tuple(self._entries))
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            if self._hard is not None or self._entries:
                f.write(_frame(record))
            f.flush()
            os.fsync(f.fileno())
        new_fd = os.open(tmp, os.O_RDWR)
        try:
            # Lock the new inode before it takes the name, so no other process can slip in.
            fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self._path)
            _fsync_dir(self._path.parent)
            os.lseek(new_fd, 0, os.SEEK_END)
        except BaseException:
            os.close(new_fd)
            raise
        self._fd = new_fd
        os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RaftStorage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StorageError(f"{self._path}: storage is closed")
        if self._broken:
            raise StorageError(f"{self._path}: an earlier write failed; restart to recover")
        return self._fd

    def _write(self, frame: bytes) -> None:
        fd = self._require_fd()
        try:
            view = memoryview(frame)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            self._broken = True
            raise


def _check(record: SaveRecord, hard: HardState | None, last_index: int) -> None:
    """ValueError if ``record`` would leave a gap in the log, truncate committed entries, move the
    commit index backwards or past the last entry. Storage trusts the core, but not blindly."""
    commit = hard.commit if hard is not None else 0
    if record.truncate_from:
        if not 0 < record.truncate_from <= last_index:
            raise ValueError(f"truncation from {record.truncate_from} outside log 1..{last_index}")
        if record.truncate_from <= commit:
            raise ValueError(
                f"truncation from {record.truncate_from} would drop committed entries (commit {commit})"
            )
        last_index = record.truncate_from - 1
    for entry in record.entries:
        if entry.index != last_index + 1:
            raise ValueError(f"entry index {entry.index} does not follow last index {last_index}")
        last_index = entry.index
    if record.hard_state is not None:
        if record.hard_state.commit < commit:
            raise ValueError(f"commit index would go back from {commit} to {record.hard_state.commit}")
        if record.hard_state.commit > last_index:
            raise ValueError(f"commit index {record.hard_state.commit} past last index {last_index}")


def _apply(record: SaveRecord, hard: HardState | None, entries: list[Entry]) -> HardState | None:
    """Apply a checked record to ``entries`` in place; the new hard state."""
    if record.truncate_from:
        del entries[record.truncate_from - 1 :]
    entries.extend(record.entries)
    return record.hard_state if record.hard_state is not None else hard
