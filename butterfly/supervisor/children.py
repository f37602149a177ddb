"""The supervisor's handle on one child process: spawn, channel, exit, restart budget.

A child runs `butterfly.<kind>.process` (forked by the fork server, or `python -m` as its plain twin:
butterfly.supervisor.launcher) holding one end of a socketpair; the handle holds the other end as an
AsyncChannel. Reports and the process exit are both turned into events on the
supervisor's queue, so the supervisor reacts to everything in one place. The handle never decides
what a death means for the node; it only counts restarts in a sliding window.

This module must not touch the board.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import time
from dataclasses import dataclass

from butterfly.ipc import AsyncChannel, ChannelClosed, Command, FrameError, Report
from butterfly.supervisor.launcher import ChildProcess, Launcher

log = logging.getLogger("butterfly.supervisor")

KINDS = ("cluster", "loader", "validator", "engine")


@dataclass(frozen=True)
class ChildReport:
    kind: str
    generation: int
    report: Report


@dataclass(frozen=True)
class ChildExited:
    kind: str
    generation: int
    returncode: int

    def describe(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name}"
        return f"exited with status {self.returncode}"


Event = ChildReport | ChildExited


class RecentCount:
    """How many times something happened within the last ``window_s`` seconds (a restart budget)."""

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque()

    def record(self, window_s: float) -> int:
        """Count one more now; returns how many fall inside the window (this one included)."""
        now = time.monotonic()
        self._times.append(now)
        while self._times and now - self._times[0] > window_s:
            self._times.popleft()
        return len(self._times)


class ChildHandle:
    def __init__(self, kind: str, events: asyncio.Queue[Event], launcher: Launcher) -> None:
        self.kind = kind
        self.events = events
        self.launcher = launcher
        self.proc: ChildProcess | None = None
        self.chan: AsyncChannel | None = None
        self.generation = 0
        # A fresh child has not beaten yet: its heartbeat age counts from its spawn, not from the
        # last beat of the process it replaced.
        self.spawned_mono_ns = 0
        self.restarts = 0
        self.last_exit = ""
        self._deaths = RecentCount()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self, first: Command) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await self.launcher.spawn(self.kind, child)
        finally:
            child.close()
        self.generation += 1
        self.spawned_mono_ns = time.monotonic_ns()
        self.chan = await AsyncChannel.open(parent)
        log.info(
            "started %s child pid %d",
            self.kind,
            self.proc.pid,
            extra={"fields": {"CHILD": self.kind, "CHILD_PID": self.proc.pid}},
        )
        gen = self.generation
        self._tasks = [
            asyncio.create_task(self._pump(self.chan, gen)),
            asyncio.create_task(self._wait(self.proc, gen)),
        ]
        await self.chan.send(first)

    async def _pump(self, chan: AsyncChannel, gen: int) -> None:
        while True:
            try:
                report = await chan.recv_report()
            except ChannelClosed:
                return
            except FrameError as e:
                # A child speaking garbage cannot be trusted: kill it and let the exit path handle it.
                log.error("%s child sent a bad frame (%s); killing it", self.kind, e)
                self.kill()
                return
            await self.events.put(ChildReport(self.kind, gen, report))

    async def _wait(self, proc: ChildProcess, gen: int) -> None:
        rc = await proc.wait()
        await self.events.put(ChildExited(self.kind, gen, rc))

    async def send(self, cmd: Command) -> bool:
        """False when the child is gone; its exit event is on the way and will be handled there."""
        if self.chan is None or not self.alive:
            return False
        try:
            await self.chan.send(cmd)
            return True
        except ChannelClosed:
            return False

    def record_death(self, window_s: float) -> int:
        """Count this death; returns how many deaths fall inside the window (this one included)."""
        return self._deaths.record(window_s)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def stop(self, shutdown: Command, timeout_s: float) -> None:
        """Ask politely, then SIGTERM, then SIGKILL; each step gets a share of the bound."""
        if self.proc is None:
            return
        if self.alive:
            await self.send(shutdown)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                self.kill(sig)
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), timeout_s / 3)
                break
            except asyncio.TimeoutError:
                log.warning("%s child pid %d did not stop in time", self.kind, self.proc.pid)
        for t in self._tasks:
            t.cancel()
        if self.chan is not None:
            self.chan.close()
