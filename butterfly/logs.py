"""Logging set-up for a node process: where records go and in which shape.

This module owns the root logger's one Butterfly handler: a bounded queue that any thread logs
into without blocking, drained by one listener thread that writes each record to

* the systemd journal via its native protocol (``"journal"`` mode) with structured fields, falling
  back to stderr lines prefixed with the syslog priority (``<6>``), which journald also parses;
* or readable text lines on stderr (``"text"`` mode);
* and, optionally, a text log file that ``LogControl.reopen()`` reopens after logrotate.

Structured fields come in as ``extra={"fields": {"PHASE": "discovery", "TERM": 3}}``; NODE_ID is
added to every record. Oversized journal entries (a long traceback) go through a sealed memfd
passed with SCM_RIGHTS, as sd_journal_send does, so nothing is truncated.

It must not decide what to log or format messages for callers, must not block the logging thread
on I/O, and must not remove handlers it did not install. The listener thread does not survive
fork(): a child process calls ``setup_logging`` itself.
"""

from __future__ import annotations

import array
import atexit
import copy
import errno
import fcntl
import json
import logging
import os
import queue
import re
import socket
import struct
import sys
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from logging.handlers import QueueHandler, QueueListener

SYSLOG_IDENTIFIER = "butterfly-node"
DEFAULT_JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_SOCKET_ENV = "BUTTERFLY_JOURNAL_SOCKET"
"""Overrides the journal socket path (tests, containers with a relocated /run)."""

QUEUE_LIMIT = 10_000
"""Records waiting for the listener before new ones are dropped (and the drop is reported)."""

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("auto", "text", "journal")

_FIELD_NAME_BAD = re.compile(r"[^A-Z0-9_]")
_TEXT_KEY_BAD = re.compile(r"[^a-z0-9_.-]")
_EXCEPTION_FORMATTER = logging.Formatter()


def syslog_priority(levelno: int) -> int:
    """The syslog priority journald and ``<N>`` prefixes use for a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def _level_label(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "CRIT"
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    return "DEBUG"


def journal_field_name(key: str) -> str | None:
    """``key`` as a valid journal field name (A-Z 0-9 _, not starting with _ or a digit, <= 64).

    Leading underscores are dropped because journald reserves them for trusted fields and
    silently discards them from clients; None when nothing usable is left.
    """
    name = _FIELD_NAME_BAD.sub("_", key.upper()).lstrip("_")
    if not name:
        return None
    if name[0].isdigit():
        name = "F_" + name
    return name[:64]


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _text_value(value: str) -> str:
    if value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _fields_of(record: logging.LogRecord) -> dict[str, str]:
    fields: dict[str, str] = getattr(record, "fields", None) or {}
    return fields


def _iso_utc(created: float) -> str:
    stamp = datetime.fromtimestamp(created, tz=timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def stderr_is_journal() -> bool:
    """True when fd 2 is the journal stream systemd connected (JOURNAL_STREAM names its dev:inode)."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        stat = os.fstat(2)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(dev), int(ino))


class _TextFormatter(logging.Formatter):
    """``2026-11-28T14:30:00.123Z INFO  node-a-7f3d message key=value``; extra lines for tracebacks."""

    def __init__(self, node_id: str, *, timestamps: bool) -> None:
        super().__init__()
        self._node_id = node_id
        self._timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_level_label(record.levelno):<5} {self._node_id} {record.getMessage()}"
        if self._timestamps:
            text = f"{_iso_utc(record.created)} {text}"
        for key, value in _fields_of(record).items():
            # Lower-case keys so `grep phase` finds both the message and the field.
            text += f" {_TEXT_KEY_BAD.sub('_', key.lower())}={_text_value(value)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for extra in (record.exc_text, record.stack_info):
            if extra:
                text += "\n" + extra
        return text


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time, optionally ``<N>``-prefixing each line."""

    def __init__(self, formatter: logging.Formatter, *, priority_prefix: bool) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._priority_prefix = priority_prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if self._priority_prefix:
                # journald reads the prefix per line, so every line of a traceback needs it.
                prefix = f"<{syslog_priority(record.levelno)}>"
                text = "\n".join(prefix + line for line in text.split("\n"))
            stream = sys.stderr
            if stream is not None:
                stream.write(text + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


def _journal_entry(record: logging.LogRecord, node_id: str) -> bytes:
    """One record in the journal's native protocol (``NAME=value\\n``, or the binary form)."""
    message = record.getMessage()
    if record.exc_info and not record.exc_text:
        record.exc_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
    for extra in (record.exc_text, record.stack_info):
        if extra:
            message += "\n" + extra
    items = [
        ("MESSAGE", message),
        ("PRIORITY", str(syslog_priority(record.levelno))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        ("LOGGER", record.name),
        ("CODE_FILE", record.pathname),
        ("CODE_LINE", str(record.lineno)),
        ("CODE_FUNC", record.funcName),
        ("NODE_ID", node_id),
    ]
    ours = {name for name, _ in items}
    for key, value in _fields_of(record).items():
        name = journal_field_name(key)
        if name is None:
            continue
        if name in ours:
            # A caller's "message" field must not shadow MESSAGE; keep it under another name.
            name = ("FIELD_" + name)[:64]
        items.append((name, value))
    out = bytearray()
    for name, value in items:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class _JournalHandler(logging.Handler):
    """Sends records to journald's native socket; on failure writes ``<N>``-prefixed stderr lines."""

    def __init__(self, path: str, node_id: str) -> None:
        super().__init__()
        self._path = path
        self._node_id = node_id
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._fallback = _StderrHandler(_TextFormatter(node_id, timestamps=False), priority_prefix=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = _journal_entry(record, self._node_id)
        except Exception:
            self.handleError(record)
            return
        try:
            self._socket.sendto(entry, self._path)
            return
        except OSError as exc:
            too_big = exc.errno in (errno.EMSGSIZE, errno.ENOBUFS)
        if too_big:
            try:
                self._send_memfd(entry)
                return
            except OSError:
                pass
        # journald is gone or restarting; its stdout/stderr reader still takes prefixed lines.
        self._fallback.emit(record)

    def _send_memfd(self, entry: bytes) -> None:
        fd = os.memfd_create("butterfly-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            # journald only accepts a sealed memfd: the entry cannot change while it reads it.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._socket.sendmsg([], rights, 0, self._path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._socket.close()
        super().close()


class _ReopenableFileHandler(logging.FileHandler):
    """A text log file that ``reopen()`` points at a fresh file after logrotate renamed the old one."""

    def __init__(self, path: str, node_id: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.setFormatter(_TextFormatter(node_id, timestamps=True))

    def reopen(self) -> None:
        # Open first: if that fails the old stream keeps receiving records instead of none.
        fresh = self._open()  # same mode and encoding as the first open, as WatchedFileHandler does
        self.acquire()
        try:
            old, self.stream = self.stream, fresh
        finally:
            self.release()
        if old is not None:
            old.close()


class _NonBlockingQueueHandler(QueueHandler):
    """Queues a self-contained copy of each record; drops (and later reports) when the queue is full.

    The copy carries the rendered message, traceback text and field values, so the listener thread
    never calls into the caller's objects, which may have changed by the time it runs.
    """

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self._records = records
        self._dropped = 0
        self._drop_lock = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.message = record.getMessage()
        prepared.msg, prepared.args = prepared.message, None
        if record.exc_info and not record.exc_text:
            prepared.exc_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
        prepared.exc_info = None
        raw = getattr(record, "fields", None)
        if raw is None:
            fields: dict[str, str] = {}
        elif isinstance(raw, Mapping):
            fields = {str(key): _render(value) for key, value in raw.items()}
        else:
            fields = {"fields": _render(raw)}
        prepared.fields = fields
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        with self._drop_lock:
            if self._dropped:
                try:
                    self._records.put_nowait(self._drop_notice(self._dropped))
                    self._dropped = 0
                except queue.Full:
                    self._dropped += 1
                    return
            try:
                self._records.put_nowait(record)
            except queue.Full:
                self._dropped += 1

    @staticmethod
    def _drop_notice(count: int) -> logging.LogRecord:
        notice = logging.LogRecord(
            __name__,
            logging.WARNING,
            __file__,
            0,
            f"dropped {count} log records: the log sink fell behind",
            None,
            None,
        )
        notice.fields = {"DROPPED": str(count)}
        return notice


class _Listener(QueueListener):
    def __init__(self, records: queue.Queue[logging.LogRecord], *sinks: logging.Handler) -> None:
        super().__init__(records, *sinks)
        self._records: queue.Queue[object] = records  # type: ignore[assignment]

    def enqueue_sentinel(self) -> None:
        # The queue is bounded; the stock put_nowait would fail on a full queue at shutdown.
        self._records.put(getattr(QueueListener, "_sentinel", None))


class LogControl:
    """Handle on the installed logging: ``reopen()`` on SIGHUP, ``flush()``, ``close()`` at exit."""

    def __init__(
        self,
        mode: str,
        records: queue.Queue[logging.LogRecord],
        handler: _NonBlockingQueueHandler,
        listener: _Listener,
        sinks: list[logging.Handler],
        file_handler: _ReopenableFileHandler | None,
    ) -> None:
        self.mode = mode
        """``"journal"`` or ``"text"``: what ``fmt="auto"`` resolved to."""
        self._records = records
        self._handler = handler
        self._listener = listener
        self._sinks = sinks
        self._file_handler = file_handler
        self._closed = False

    def reopen(self) -> None:
        """Reopen the log file by name (logrotate moved it); on failure keep the old one and say so."""
        if self._file_handler is None or self._closed:
            return
        try:
            self._file_handler.reopen()
        except OSError as exc:
            logging.getLogger(__name__).error(
                "cannot reopen the log file; still writing to the old one",
                extra={"fields": {"LOG_FILE": self._file_handler.baseFilename, "ERROR": str(exc)}},
            )

    def flush(self) -> None:
        """Wait until every record logged so far has been written."""
        if not self._closed:
            self._records.join()

    def close(self) -> None:
        """Write what is queued, then detach from the root logger and close the sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        logging.getLogger().removeHandler(self._handler)
        self._listener.stop()
        for sink in self._sinks:
            sink.close()
        self._handler.close()

    def __enter__(self) -> LogControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_active: LogControl | None = None


def setup_logging(level: str, node_id: str, file: str | None = None, fmt: str = "auto") -> LogControl:
    """Route the root logger through the queue to the journal or stderr, and to ``file``.

    Calling it again replaces the previous set-up. Raises ValueError for an unknown level or format
    and OSError when ``file`` cannot be opened (nothing is installed then).
    """
    global _active
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    file_handler = _ReopenableFileHandler(file, node_id) if file else None
    mode = "journal" if fmt == "journal" or (fmt == "auto" and stderr_is_journal()) else "text"
    sinks: list[logging.Handler]
    if mode == "journal":
        path = os.environ.get(JOURNAL_SOCKET_ENV) or DEFAULT_JOURNAL_SOCKET
        sinks = [_JournalHandler(path, node_id)]
    else:
        sinks = [_StderrHandler(_TextFormatter(node_id, timestamps=True), priority_prefix=False)]
    if file_handler is not None:
        sinks.append(file_handler)

    if _active is not None:
        _active.close()
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_LIMIT)
    handler = _NonBlockingQueueHandler(records)
    listener = _Listener(records, *sinks)
    root = logging.getLogger()
    root.setLevel(LEVELS[level])
    root.addHandler(handler)
    listener.start()
    _active = LogControl(mode, records, handler, listener, sinks, file_handler)
    # Records still queued at interpreter exit would be lost with the daemon listener thread.
    atexit.register(_active.close)
    return _active
