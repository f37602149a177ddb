"""How the supervisor starts a child: forked by the preloaded fork server, or a fresh interpreter.

``Launcher.spawn(kind, sock)`` returns a ``ChildProcess`` (pid, returncode, ``wait()``,
``send_signal()``) either way, so ``ChildHandle`` does not care which. The fork server
(butterfly.supervisor.forkserver) is started at once when the supervisor starts, overlapping its
imports with the supervisor's own start-up, and again if it ever dies. Its children are signalled
through a pidfd (never a recycled pid); their exits arrive as reports from the server, and if the
server itself dies its children die with it (PR_SET_PDEATHSIG) and are reported killed.

The plain twin, one ``python -m butterfly.<kind>.process`` per child, is used with
``BUTTERFLY_NO_FORKSERVER=1`` or when the fork server cannot be started.

Must not: block the event loop (the control socket is read by a loop reader, non-blocking), or
touch the board.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import Protocol

from butterfly.supervisor import forkserver
from butterfly.supervisor.childproc import CHILD_FD_ENV, SUPERVISOR_PID_ENV

log = logging.getLogger("butterfly.supervisor")

NO_FORKSERVER_ENV = "BUTTERFLY_NO_FORKSERVER"
# A fork server that has not forked a child this long after the request (stuck importing a module,
# say) is killed and the child started as a fresh interpreter instead.
SPAWN_TIMEOUT_S = 120.0
# A fork server lost this many times (crashing on a seccomp filter, say) is given up for good.
MAX_SERVER_LOSSES = 3
# How long a node's stop lets the fork server return by itself before it is killed (``close``).
CLOSE_GRACE_S = 0.5


class ChildProcess(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class ForkedChild:
    """A child of the fork server, as the supervisor sees it."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self._pid = pid
        self._pidfd: int | None = pidfd
        self._returncode: int | None = None
        self._exited = asyncio.Event()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def exited(self, status: int) -> None:
        if self._returncode is None:
            self._returncode = status
            self._exited.set()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def send_signal(self, sig: int) -> None:
        if self._pidfd is None or self._returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, sig)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Only the supervisor talks to systemd (NotifyAccess=main).
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


class Launcher:
    def __init__(self) -> None:
        self.use_forkserver = os.environ.get(NO_FORKSERVER_ENV) != "1" and hasattr(os, "pidfd_open")
        self._server: asyncio.subprocess.Process | None = None
        self._ctl: socket.socket | None = None
        self._pending: collections.deque[tuple[str, asyncio.Future[ForkedChild]]] = collections.deque()
        self._children: dict[int, ForkedChild] = {}
        self._lock = asyncio.Lock()
        self._losses = 0

    async def start(self) -> None:
        """Start the fork server now (it imports while the supervisor gets going); no-op for the twin."""
        if not self.use_forkserver or self._ctl is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = child_env()
        env[forkserver.FORKSERVER_FD_ENV] = str(theirs.fileno())
        try:
            self._server = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "butterfly.supervisor.forkserver",
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as e:
            ours.close()
            log.warning("cannot start the fork server (%s): children start as fresh interpreters", e)
            self.use_forkserver = False
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._ctl = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)
        asyncio.create_task(self._watch(self._server))
        log.info("fork server pid %d started", self._server.pid)

    async def spawn(self, kind: str, sock: socket.socket) -> ChildProcess:
        """Start child ``kind`` holding ``sock`` (the caller closes its copy afterwards)."""
        if self.use_forkserver:
            async with self._lock:
                await self.start()
                if self._ctl is not None:
                    fut: asyncio.Future[ForkedChild] = asyncio.get_running_loop().create_future()
                    self._pending.append((kind, fut))
                    forkserver.send(self._ctl, {"kind": kind}, sock.fileno())
                    try:
                        return await asyncio.wait_for(fut, SPAWN_TIMEOUT_S)
                    except asyncio.TimeoutError:
                        log.error("fork server did not start %s in %.0fs; killing it", kind, SPAWN_TIMEOUT_S)
                        self._lost()
                    except ConnectionError as e:
                        log.warning("fork server lost while starting %s (%s); starting it fresh", kind, e)
        env = child_env()
        env[CHILD_FD_ENV] = str(sock.fileno())
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            forkserver.module_name(kind),
            pass_fds=(sock.fileno(),),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
        )

    def _on_readable(self) -> None:
        ctl = self._ctl
        assert ctl is not None
        while True:
            try:
                msg, fd = forkserver.recv(ctl)
            except BlockingIOError:
                return
            except (OSError, ValueError, json.JSONDecodeError) as e:
                log.error("fork server sent a bad message (%s); restarting it", e)
                self._lost()
                return
            if msg is None:
                self._lost()
                return
            self._handle(msg, fd)

    def _handle(self, msg: dict[str, object], fd: int | None) -> None:
        if "exited" in msg:
            child = self._children.pop(int(str(msg["exited"])), None)
            if child is not None:
                child.exited(int(str(msg["status"])))
            return
        if not self._pending:
            if fd is not None:
                os.close(fd)
            return
        kind, fut = self._pending.popleft()
        if "spawned" in msg and fd is not None:
            child = ForkedChild(int(str(msg["pid"])), fd)
            self._children[child.pid] = child
            if not fut.done():
                fut.set_result(child)
            return
        if fd is not None:
            os.close(fd)
        if not fut.done():
            fut.set_exception(ConnectionError(f"fork server could not start {kind}: {msg.get('reason')}"))

    async def _watch(self, server: asyncio.subprocess.Process) -> None:
        rc = await server.wait()
        if server is self._server:
            log.error("fork server pid %d exited (%s)", server.pid, rc)
            self._lost()

    def _lost(self) -> None:
        """The server is gone: so are its children (PR_SET_PDEATHSIG); the next spawn starts a new one,
        unless servers keep dying: then children start as fresh interpreters from now on."""
        self._losses += 1
        if self._losses >= MAX_SERVER_LOSSES and self.use_forkserver:
            log.error("fork server lost %d times: children start as fresh interpreters", self._losses)
            self.use_forkserver = False
        if self._ctl is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
        if self._server is not None and self._server.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._server.kill()
        self._server = None
        for child in self._children.values():
            child.send_signal(signal.SIGKILL)
            child.exited(-signal.SIGKILL)
        self._children.clear()
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("the fork server exited"))

    async def close(self) -> None:
        """Stop the fork server (after the children were stopped)."""
        server = self._server
        if self._ctl is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._ctl.close()  # the server returns when its end reads EOF
            self._ctl = None
        self._server = None
        if server is not None:
            # Idle, it reads the EOF and returns at once. Busy preloading (torch's import takes seconds
            # on a loaded machine) it would read it only after, and a node's stop waited for that. It
            # holds nothing worth waiting for, its children stopped first: it is killed after a moment.
            try:
                await asyncio.wait_for(server.wait(), CLOSE_GRACE_S)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    server.kill()
                await server.wait()
