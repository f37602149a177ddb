"""systemd service notifications (sd_notify) for the supervisor, the unit's main process.

This module owns the datagrams sent to ``$NOTIFY_SOCKET`` (READY=1, STATUS=, WATCHDOG=1,
EXTEND_TIMEOUT_USEC=, STOPPING=1) and reading the watchdog interval systemd asks for. It sends
through the ``sdnotify`` package; "@name" (abstract) socket addresses work because sdnotify maps
them to a leading NUL.

It must never raise into the caller or block it: a failed send is logged once and the node goes
on. It must not decide when to notify (the supervisor does) and only the main process may use it
(the unit runs with NotifyAccess=main; children's messages would be ignored).
"""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    """Talks to systemd when it started us with ``Type=notify``; otherwise every call does nothing.

    ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read when the Notifier is made.
    Keep them in the supervisor's own environment (strip them only from children's): after a
    failed send the Notifier reconnects, and sdnotify reads ``NOTIFY_SOCKET`` again to do so.
    Each method returns True when the datagram was handed to the socket.
    """

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        """True when systemd gave us a notification socket."""
        self._watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        self._watchdog_pid = os.environ.get("WATCHDOG_PID", "")
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._warned = False

    def ready(self, status: str | None = None) -> bool:
        """The node is validated and serving (the unit becomes "active")."""
        return self._send("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Free-form status shown by ``systemctl status`` (phase and progress)."""
        return self._send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive; send at least every ``watchdog_interval()`` seconds while the node is healthy."""
        return self._send("WATCHDOG=1")

    def extend_timeout(self, usec: int) -> bool:
        """Ask for ``usec`` more microseconds before the start (or stop) timeout fires."""
        if isinstance(usec, bool) or not isinstance(usec, int) or usec < 0:
            raise ValueError(f"extend_timeout needs a non-negative integer of microseconds, not {usec!r}")
        return self._send(f"EXTEND_TIMEOUT_USEC={usec}")

    def stopping(self) -> bool:
        """The node is shutting down."""
        return self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None if no watchdog is ours.

        WATCHDOG_PID, when set, names the process the watchdog is for; another pid (a child that
        inherited the environment) must not ping.
        """
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        if not self._watchdog_usec.isdigit() or int(self._watchdog_usec) == 0:
            return None
        # Half the timeout, as sd_watchdog_enabled(3) advises, so one late ping is not fatal.
        return int(self._watchdog_usec) / 2 / 1_000_000

    def _send(self, message: str) -> bool:
        if not self.enabled:
            return False
        # Two tries: the second on a fresh socket, because a connected datagram socket stays
        # refused forever once systemd re-executes (daemon-reexec) and binds the path anew.
        for _ in range(2):
            try:
                if self._notifier is None:
                    self._notifier = sdnotify.SystemdNotifier(debug=True)
                self._notifier.notify(message)
                return True
            except Exception as exc:  # sdnotify raises TypeError/OSError/...; none may reach the caller
                error = exc
                self._drop_socket()
        if not self._warned:
            self._warned = True
            log.warning(
                "cannot notify systemd; further failures are logged at debug level",
                extra={
                    "fields": {"NOTIFY_SOCKET": os.environ.get("NOTIFY_SOCKET", ""), "ERROR": repr(error)}
                },
            )
        else:
            log.debug("cannot notify systemd", extra={"fields": {"ERROR": repr(error)}})
        return False

    def _drop_socket(self) -> None:
        if self._notifier is not None and self._notifier.socket is not None:
            self._notifier.socket.close()
        self._notifier = None


def _one_line(text: str) -> str:
    # A newline would end the assignment and start another (a STATUS containing "READY=1"...).
    return " ".join(text.splitlines())
