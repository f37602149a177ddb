"""When a repeated "waiting" line is worth writing: when it changes, then once per interval.

The cluster child reports its waiting reason with every progress event, many times a second while a
node waits for a quorum or a plan; one line each would bury the journal. ``WaitLog`` says yes to a
reason that differs from the last one written and, while it stays the same, once per ``interval_s``
(saying for how long it has held). It keeps no clock of its own: callers pass monotonic time.
"""

from __future__ import annotations


class WaitLog:
    def __init__(self, interval_s: float = 30.0) -> None:
        self.interval_s = interval_s
        self._reason = ""
        self._since = 0.0
        self._written = 0.0

    def line(self, reason: str, now: float) -> str | None:
        """The line to write for ``reason`` now, or None to stay quiet; "" means "no longer waiting"."""
        if reason != self._reason:
            self._reason, self._since, self._written = reason, now, now
            return reason or None
        if not reason or now - self._written < self.interval_s:
            return None
        self._written = now
        return f"{reason} (still, for {now - self._since:.0f} s)"
