"""Logging: native journal datagrams on a real AF_UNIX socket, the <N> stderr fallback, text lines,
file reopen after logrotate, and a caller that never waits for a slow sink."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from butterfly import logs
from butterfly.logs import LogControl, journal_field_name, setup_logging, stderr_is_journal, syslog_priority

NODE = "node-a-7f3d"
log = logging.getLogger("butterfly.test")

Setup = Callable[..., LogControl]


@pytest.fixture
def setup() -> Iterator[Setup]:
    """setup_logging, undone after the test so the root logger is as pytest left it."""
    root = logging.getLogger()
    level = root.level
    controls: list[LogControl] = []

    def make(level: str = "info", file: str | None = None, fmt: str = "auto") -> LogControl:
        control = setup_logging(level, NODE, file=file, fmt=fmt)
        controls.append(control)
        return control

    yield make
    for control in controls:
        control.close()
    root.setLevel(level)


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for journald, named by BUTTERFLY_JOURNAL_SOCKET."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(path))
    yield sock
    sock.close()


def parse_native(data: bytes) -> dict[str, str]:
    """The journal native protocol: NAME=value\\n, or NAME\\n<le64 size><value>\\n for binary values."""
    fields: dict[str, str] = {}
    at = 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            at = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            at = end + 10 + size
        assert re.fullmatch(rb"[A-Z0-9][A-Z0-9_]{0,63}", name), name
        assert name.decode() not in fields
        fields[name.decode()] = value.decode()
    return fields


def test_journal_entry_has_the_native_fields(setup: Setup, journal: socket.socket) -> None:
    control = setup(fmt="journal")
    assert control.mode == "journal"
    line = sys._getframe().f_lineno + 1
    log.info(
        "entered %s", "discovery", extra={"fields": {"PHASE": "discovery", "TERM": 3, "DURATION_S": 1.25}}
    )
    control.flush()
    entry = parse_native(journal.recv(65536))
    assert entry == {
        "MESSAGE": "entered discovery",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "butterfly-node",
        "LOGGER": "butterfly.test",
        "CODE_FILE": __file__,
        "CODE_LINE": str(line),
        "CODE_FUNC": "test_journal_entry_has_the_native_fields",
        "NODE_ID": NODE,
        "PHASE": "discovery",
        "TERM": "3",
        "DURATION_S": "1.25",
    }


def test_journal_multiline_values_use_the_binary_form(setup: Setup, journal: socket.socket) -> None:
    control = setup(fmt="journal")
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        log.exception("load failed", extra={"fields": {"detail": "line one\nline two"}})
    control.flush()
    data = journal.recv(65536)
    assert b"MESSAGE\n" in data and b"DETAIL\n" in data
    entry = parse_native(data)
    assert entry["PRIORITY"] == "3"
    assert entry["DETAIL"] == "line one\nline two"
    assert entry["MESSAGE"].startswith("load failed\nTraceback (most recent call last):")
    assert entry["MESSAGE"].endswith("RuntimeError: disk on fire")


def test_journal_field_names_are_made_valid(setup: Setup, journal: socket.socket) -> None:
    control = setup(fmt="journal")
    fields = {"phase": "x", "_trusted": 1, "9lives": 2, "bytes done": 3, "message": "mine", "___": 4}
    log.warning("names", extra={"fields": fields})
    control.flush()
    entry = parse_native(journal.recv(65536))
    assert entry["PRIORITY"] == "4"
    assert entry["MESSAGE"] == "names"
    assert entry["FIELD_MESSAGE"] == "mine"
    assert (entry["PHASE"], entry["TRUSTED"], entry["F_9LIVES"], entry["BYTES_DONE"]) == ("x", "1", "2", "3")
    assert journal_field_name("a" * 80) == "A" * 64
    assert journal_field_name("___") is None


def datagram_limit() -> int:
    """The largest datagram an unconfigured AF_UNIX socket may send (its send buffer size)."""
    try:
        return int(Path("/proc/sys/net/core/wmem_default").read_text())
    except (OSError, ValueError):
        return 1 << 20


def test_journal_entry_too_big_for_a_datagram_goes_through_a_sealed_memfd(
    setup: Setup, journal: socket.socket
) -> None:
    control = setup(fmt="journal")
    big = "x" * (2 * datagram_limit())
    log.error(big)
    control.flush()
    data, ancillary, _, _ = journal.recvmsg(65536, socket.CMSG_SPACE(4))
    assert data == b""
    [(level, kind, fd_bytes)] = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = struct.unpack("i", fd_bytes[:4])[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        size = os.fstat(fd).st_size
        entry = parse_native(os.pread(fd, size, 0))
    finally:
        os.close(fd)
    assert entry["MESSAGE"] == big
    assert entry["NODE_ID"] == NODE


def test_below_level_records_are_not_sent(setup: Setup, journal: socket.socket) -> None:
    control = setup(level="warning", fmt="journal")
    log.info("quiet")
    log.warning("loud")
    control.flush()
    assert parse_native(journal.recv(65536))["MESSAGE"] == "loud"
    journal.settimeout(0.05)
    with pytest.raises(TimeoutError):
        journal.recv(65536)


def test_unreachable_journal_falls_back_to_prefixed_stderr(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(tmp_path / "no-journal.sock"))
    control = setup(fmt="journal")
    log.info("joined", extra={"fields": {"PHASE": "discovery", "PEERS": "a b"}})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    control.flush()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f'<6>INFO  {NODE} joined phase=discovery peers="a b"'
    assert lines[1] == f"<3>ERROR {NODE} failed"
    assert lines[2] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: bad"
    assert all(line.startswith("<3>") for line in lines[1:])


def test_text_mode_writes_readable_lines_to_stderr(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    control = setup(level="debug", fmt="text")
    assert control.mode == "text"
    log.debug("tick")
    log.info("phase change", extra={"fields": {"PHASE": "discovery", "TERM": 3, "DURATION_S": 1.25}})
    log.warning("odd", extra={"fields": {"why": 'a "quoted" = value', "empty": "", "ok": True}})
    log.critical("down")
    control.flush()
    lines = capsys.readouterr().err.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(stamp + f" DEBUG {NODE} tick", lines[0])
    assert re.fullmatch(
        stamp + f" INFO  {NODE} phase change phase=discovery term=3 duration_s=1.25", lines[1]
    )
    assert lines[2].endswith(f'WARN  {NODE} odd why="a \\"quoted\\" = value" empty="" ok=true')
    assert lines[3].endswith(f"CRIT  {NODE} down")


def test_auto_mode_follows_journal_stream(
    setup: Setup, journal: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    assert stderr_is_journal()
    assert setup().mode == "journal"
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
    assert not stderr_is_journal()
    assert setup().mode == "text"
    for junk in ("", "12", "a:b"):
        monkeypatch.setenv("JOURNAL_STREAM", junk)
        assert not stderr_is_journal()


def test_file_is_reopened_after_logrotate_renames_it(setup: Setup, tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    control = setup(file=str(path), fmt="text")
    log.info("before rotation")
    control.flush()
    path.rename(tmp_path / "node.log.1")
    log.info("after rename, before SIGHUP")
    control.flush()
    control.reopen()
    log.info("after reopen", extra={"fields": {"PHASE": "ready"}})
    control.flush()
    old = (tmp_path / "node.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    prefix = re.compile(r"\S+Z INFO  " + NODE + " ")
    assert [prefix.sub("", line) for line in old] == ["before rotation", "after rename, before SIGHUP"]
    assert [prefix.sub("", line) for line in new] == ["after reopen phase=ready"]


def test_failed_reopen_keeps_the_old_file_and_says_so(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    control = setup(file=str(log_dir / "node.log"), fmt="text")
    (log_dir / "node.log").rename(tmp_path / "moved.log")
    log_dir.rmdir()
    control.reopen()
    log.info("still here")
    control.flush()
    moved = (tmp_path / "moved.log").read_text()
    assert "cannot reopen the log file; still writing to the old one" in moved
    assert "still here" in moved
    assert "cannot reopen the log file" in capsys.readouterr().err


def test_unopenable_file_raises_before_installing_anything(setup: Setup, tmp_path: Path) -> None:
    before = list(logging.getLogger().handlers)
    with pytest.raises(OSError):
        setup(file=str(tmp_path / "missing-dir" / "node.log"))
    assert logging.getLogger().handlers == before


class StalledStream:
    """A stderr whose writes wait until released: a sink that fell behind."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.release.wait(10)
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_caller_never_waits_for_a_stalled_sink(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = StalledStream()
    monkeypatch.setattr(sys, "stderr", stream)
    control = setup(fmt="text")
    started = time.monotonic()
    for i in range(200):
        log.info("record %d", i)
    assert time.monotonic() - started < 1.0
    assert stream.lines == []
    stream.release.set()
    control.flush()
    assert len(stream.lines) == 200
    assert stream.lines[-1].endswith(" record 199\n")


def test_full_queue_drops_and_reports_the_count() -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue(2)
    handler = logs._NonBlockingQueueHandler(records)
    for i in range(5):
        handler.handle(logging.makeLogRecord({"msg": f"r{i}", "levelno": logging.INFO}))
    assert [records.get_nowait().getMessage() for _ in range(2)] == ["r0", "r1"]
    handler.handle(logging.makeLogRecord({"msg": "r5", "levelno": logging.INFO}))
    notice, last = records.get_nowait(), records.get_nowait()
    assert notice.getMessage() == "dropped 3 log records: the log sink fell behind"
    assert notice.levelno == logging.WARNING
    assert vars(notice)["fields"] == {"DROPPED": "3"}
    assert last.getMessage() == "r5"


def test_records_are_snapshots_taken_when_logged(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = StalledStream()
    monkeypatch.setattr(sys, "stderr", stream)
    control = setup(fmt="text")
    peers = ["a"]
    log.info("peers %s", peers, extra={"fields": {"PEERS": peers}})
    peers.append("b")  # while the record still waits in the queue
    stream.release.set()
    control.flush()
    assert stream.lines[0].endswith(" peers ['a'] peers=['a']\n")


def test_setup_again_replaces_the_previous_handler(setup: Setup) -> None:
    setup(fmt="text")
    setup(fmt="text")
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._NonBlockingQueueHandler)]
    assert len(ours) == 1


def test_close_writes_what_is_queued_and_is_idempotent(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    control = setup(fmt="text")
    for i in range(50):
        log.info("bye %d", i)
    control.close()
    control.close()
    assert len(capsys.readouterr().err.splitlines()) == 50
    log.info("after close")
    assert "after close" not in capsys.readouterr().err


def test_bad_level_or_format_is_a_value_error(setup: Setup) -> None:
    with pytest.raises(ValueError, match="log level"):
        setup(level="trace")
    with pytest.raises(ValueError, match="log format"):
        setup(fmt="json")


def test_syslog_priorities() -> None:
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]
    assert [syslog_priority(level) for level in levels] == [7, 6, 4, 3, 2]
