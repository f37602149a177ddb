"""What every child process does before its own work: the child's side of the supervisor contract.

A child is started as `python -m butterfly.<kind>.process` with one end of a socketpair in the fd
named by BUTTERFLY_CHILD_FD. It
- ignores SIGINT (Ctrl-C reaches the whole process group; the supervisor decides the stop order),
- asks the kernel to SIGKILL it if the supervisor dies (a SIGKILLed supervisor leaves no orphans),
- reads the Init frame, parses the effective config, sets up logging and attaches the board.

The sync flavour (loader, validator) gets commands from a reader thread through a queue, so the main
thread can beat its heartbeat while idle and poll for cancellation between chunks while busy.
This module must not know what any particular child does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from butterfly.board import Board
from butterfly.config import Config, parse_config
from butterfly.ipc import ChannelClosed, Command, Init, Shutdown, SyncChannel
from butterfly.logs import LogControl, setup_logging

PR_SET_PDEATHSIG = 1
CHILD_FD_ENV = "BUTTERFLY_CHILD_FD"
SUPERVISOR_PID_ENV = "BUTTERFLY_SUPERVISOR_PID"
# How often an idle child proves its main thread is alive on the board.
HEARTBEAT_S = 0.25
START_DELAY_ENV = "BUTTERFLY_TEST_START_DELAY_S"

T = TypeVar("T")


def die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel kills us when the supervisor thread that forked us exits."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The supervisor may have died between fork and prctl: then we were re-parented already.
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)


def child_socket() -> socket.socket:
    try:
        fd = int(os.environ[CHILD_FD_ENV])
    except (KeyError, ValueError):
        sys.stderr.write(f"butterfly child processes are started by butterfly-node ({CHILD_FD_ENV} unset)\n")
        raise SystemExit(2) from None
    return socket.socket(fileno=fd)


@dataclass
class ChildContext:
    kind: str
    config: Config
    board: Board
    init: Init
    log: logging.Logger
    logs: LogControl


def bootstrap(kind: str, sock: socket.socket) -> tuple[ChildContext, SyncChannel]:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    chan = SyncChannel(sock)
    try:
        first = chan.recv()
    except ChannelClosed:
        # The node stopped between this child's fork and its Init: nothing was begun, nothing to say.
        raise SystemExit(0) from None
    if not isinstance(first, Init):
        raise SystemExit(f"{kind}: expected Init as the first frame, got {type(first).__name__}")
    config = parse_config(first.config_toml, source="<supervisor>", base_dir=Path(first.config_base_dir))
    logs = setup_logging(
        config.logging.level,
        config.node.id,
        str(config.logging.file) if config.logging.file else None,
        config.logging.format,
    )
    # Fault injection for tests: a child slow to start (a loaded machine) must not look hung.
    time.sleep(float(os.environ.get(START_DELAY_ENV, "0") or 0))
    board = Board.attach(first.board_name)
    log = logging.getLogger(f"butterfly.{kind}")
    return ChildContext(kind, config, board, first, log, logs), chan


class CommandInbox:
    """Commands from the supervisor, read by a daemon thread. A closed channel becomes Shutdown,
    and if the main thread does not finish within grace_s the process exits anyway."""

    def __init__(self, chan: SyncChannel, grace_s: float = 5.0) -> None:
        self._q: queue.Queue[Command] = queue.Queue()
        self._chan = chan
        self._grace_s = grace_s
        self.shutdown_requested = threading.Event()
        threading.Thread(target=self._read, name="inbox", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                cmd = self._chan.recv()
            except (ChannelClosed, OSError):
                cmd = Shutdown()
            if isinstance(cmd, Shutdown):
                self.shutdown_requested.set()
                self._q.put(cmd)
                time.sleep(self._grace_s)
                os._exit(0)
            self._q.put(cmd)

    def get(self, timeout: float) -> Command | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending(self) -> Command | None:
        return self.get(timeout=0) if not self._q.empty() else None


def run_beside(fn: Callable[[], T], beat: Callable[[], None], interval_s: float = HEARTBEAT_S) -> T:
    """Run ``fn`` on a helper thread while this (the main) thread calls ``beat`` every ``interval_s``;
    return its result or raise its exception.

    For a long step that cannot report progress itself (one big C call: a GPU upload, a kernel
    compile, a forward pass): without it the main thread falls silent for the whole step and the
    supervisor kills a child that is working. The beat then means "the main thread is alive and the
    step's thread is still running"; a step stuck forever is a matter for its own timeouts.
    ``fn`` should take what it needs from a holder the caller empties afterwards (not a closure over
    a view of shared memory, which would outlive the step).
    """
    out: list[T] = []
    err: list[BaseException] = []

    def work() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # re-raised on the calling thread
            # The step's frames may hold views of shared memory that the caller unmaps next: keep the
            # traceback's lines, drop its locals.
            traceback.clear_frames(e.__traceback__)
            err.append(e)

    t = threading.Thread(target=work, name="step", daemon=True)
    t.start()
    while True:
        beat()
        t.join(interval_s)
        if not t.is_alive():
            break
    if err:
        raise err[0]
    return out[0]


# Fault injection for tests: a child about to do a phase's work waits while the file
# $BUTTERFLY_TEST_HOLD_DIR/hold-<phase> exists, beating its heartbeat, so a test can kill processes
# at a known point. Unset in production, where this costs one environment lookup per phase.
HOLD_DIR_ENV = "BUTTERFLY_TEST_HOLD_DIR"


def _hold_path(phase: str) -> Path | None:
    d = os.environ.get(HOLD_DIR_ENV)
    return Path(d) / f"hold-{phase}" if d else None


def held(phase: str) -> bool:
    path = _hold_path(phase)
    return path is not None and path.exists()


def hold_if_requested(phase: str, beat: Callable[[], None]) -> None:
    path = _hold_path(phase)
    while path is not None and path.exists():
        beat()
        time.sleep(0.05)


async def hold_if_requested_async(phase: str, beat: Callable[[], None]) -> None:
    import asyncio

    path = _hold_path(phase)
    while path is not None and path.exists():
        beat()
        await asyncio.sleep(0.05)
