"""Notifier: the exact sd_notify datagrams on a real AF_UNIX socket (a path and an abstract name),
the watchdog interval, and failures that are logged once and never raised."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from butterfly.notify import Notifier


def listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def path_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify.sock")
    sock = listen(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"butterfly-test-{uuid.uuid4().hex}"
    sock = listen("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def exchange(listener: socket.socket, notifier: Notifier) -> list[bytes]:
    assert notifier.ready() is True
    assert notifier.status("loading_weights 45.2% eta 68s") is True
    assert notifier.watchdog() is True
    assert notifier.extend_timeout(30_000_000) is True
    assert notifier.stopping() is True
    return [listener.recv(4096) for _ in range(5)]


EXPECTED = [
    b"READY=1",
    b"STATUS=loading_weights 45.2% eta 68s",
    b"WATCHDOG=1",
    b"EXTEND_TIMEOUT_USEC=30000000",
    b"STOPPING=1",
]


def test_datagrams_on_a_filesystem_socket(path_listener: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert exchange(path_listener, notifier) == EXPECTED


def test_datagrams_on_an_abstract_socket(abstract_listener: socket.socket) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert exchange(abstract_listener, notifier) == EXPECTED


def test_ready_with_status_is_one_datagram(path_listener: socket.socket) -> None:
    Notifier().ready(status="ready")
    assert path_listener.recv(4096) == b"READY=1\nSTATUS=ready"


def test_status_is_kept_on_one_line(path_listener: socket.socket) -> None:
    # A newline would start another assignment: "STATUS=x\nREADY=1" must not declare readiness.
    Notifier().status("x\nREADY=1")
    assert path_listener.recv(4096) == b"STATUS=x READY=1"


def test_without_notify_socket_every_call_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier()
    assert not notifier.enabled
    assert [notifier.ready(), notifier.status("x"), notifier.watchdog(), notifier.stopping()] == [False] * 4
    assert notifier.extend_timeout(1) is False
    assert caplog.records == []


def test_unreachable_socket_is_logged_once_and_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    caplog.set_level(logging.DEBUG, logger="butterfly.notify")
    notifier = Notifier()
    assert notifier.enabled
    assert [notifier.ready(), notifier.watchdog(), notifier.status("x")] == [False, False, False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith("cannot notify systemd")
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 2


def test_reconnects_when_systemd_rebinds_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    first = listen(path)
    notifier = Notifier()
    notifier.watchdog()
    assert first.recv(4096) == b"WATCHDOG=1"
    # daemon-reexec: the old socket goes away and a new one is bound at the same path.
    first.close()
    os.unlink(path)
    second = listen(path)
    try:
        assert notifier.watchdog() is True
        assert second.recv(4096) == b"WATCHDOG=1"
    finally:
        second.close()


def test_extend_timeout_rejects_negative_values(path_listener: socket.socket) -> None:
    with pytest.raises(ValueError):
        Notifier().extend_timeout(-1)


@pytest.mark.parametrize(
    ("usec", "pid", "interval"),
    [
        ("20000000", None, 10.0),
        ("20000000", "self", 10.0),
        ("20000000", "other", None),
        ("3000000", None, 1.5),
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
        ("-5", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, interval: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() if pid == "self" else os.getpid() + 1))
    assert Notifier().watchdog_interval() == interval
