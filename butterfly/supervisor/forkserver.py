"""The fork server: one preloaded interpreter that forks the node's children, so none starts from scratch.

Started once by the supervisor (``python -m butterfly.supervisor.forkserver``, one end of a
SOCK_SEQPACKET socketpair in ``BUTTERFLY_FORKSERVER_FD``). For each request (a child kind, with that
child's end of its own channel attached as SCM_RIGHTS) it imports ``butterfly.<kind>.process`` if it
has not yet, forks, and the child runs that module's ``main()`` exactly as ``python -m`` would have.
It answers with the child's pid and a pidfd (so the supervisor signals that very process, never a
recycled pid), reaps its children and reports each exit status. While no request waits it preloads
the other kinds' modules (torch with the engine's), so a restarted child is forked in milliseconds.

Without it every node started three or four interpreters, each importing numpy, msgspec, aiohttp
and uvloop (and torch) on its own: on two cores the bulk of a 3-node cluster's formation time.

Messages are small JSON objects, never pickle: requests ``{"kind": K}``, answers
``{"spawned": K, "pid": N}`` (pidfd attached) or ``{"failed": K, "reason": R}``, and
``{"exited": N, "status": S}`` (S as ``Popen.returncode``: -signal when killed).

Must not: create threads or an event loop before it forks (a fork would copy them half-made), set up
logging (each child does its own), or outlive the supervisor (PR_SET_PDEATHSIG; its children have it
too, towards the fork server).
"""

from __future__ import annotations

import array
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback

from butterfly.supervisor.childproc import CHILD_FD_ENV, SUPERVISOR_PID_ENV, die_with_parent

FORKSERVER_FD_ENV = "BUTTERFLY_FORKSERVER_FD"
# Every kind a supervisor may ask for, in the order they are preloaded when the server is idle.
PRELOAD = ("cluster", "validator", "loader", "engine")
MAX_MSG = 4096


def send(sock: socket.socket, msg: dict[str, object], fd: int | None = None) -> None:
    data = json.dumps(msg).encode()
    if fd is None:
        sock.sendmsg([data])
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def recv(sock: socket.socket) -> tuple[dict[str, object] | None, int | None]:
    """One message and the descriptor that came with it; (None, None) when the other end closed."""
    data, anc, _, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(array.array("i").itemsize))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, None
    msg = json.loads(data)
    if not isinstance(msg, dict):
        raise ValueError(f"fork server message is not an object: {msg!r}")
    for extra in fds[1:]:
        os.close(extra)
    return msg, fds[0] if fds else None


def module_name(kind: str) -> str:
    """The module a child of ``kind`` runs: ``butterfly.<kind>.process``, except the engine child,
    which is the serving layer's (the engine package knows nothing of processes)."""
    if kind not in PRELOAD:
        raise ValueError(f"unknown child kind {kind!r}")
    return "butterfly.serving.process" if kind == "engine" else f"butterfly.{kind}.process"


def _preload(kind: str) -> None:
    try:
        importlib.import_module(module_name(kind))
    except ImportError:
        pass  # a kind this install does not have (or whose optional dependency is missing)


def _child(kind: str, fd: int, ctl: socket.socket, wake: tuple[int, int]) -> None:
    """In the forked child: become ``python -m butterfly.<kind>.process``; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for w in wake:
            os.close(w)
        ctl.close()
        os.environ[CHILD_FD_ENV] = str(fd)
        # The child's parent is this server: that is whom its PR_SET_PDEATHSIG must watch.
        os.environ[SUPERVISOR_PID_ENV] = str(os.getppid())
        module = importlib.import_module(module_name(kind))
        sys.argv = [module.__file__ or kind]
        module.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _reap(ctl: socket.socket) -> None:
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send(ctl, {"exited": pid, "status": _status(raw)})


def _spawn(ctl: socket.socket, msg: dict[str, object], fd: int | None, wake: tuple[int, int]) -> None:
    kind = str(msg.get("kind"))
    if fd is None:
        send(ctl, {"failed": kind, "reason": "no channel descriptor came with the request"})
        return
    try:
        module_name(kind)
        _preload(kind)
        pid = os.fork()
    except (OSError, ValueError) as e:
        os.close(fd)
        send(ctl, {"failed": kind, "reason": str(e)})
        return
    if pid == 0:
        _child(kind, fd, ctl, wake)
    os.close(fd)
    # Opened before this server can reap it, so it names this child and no other.
    pidfd = os.pidfd_open(pid)
    try:
        send(ctl, {"spawned": kind, "pid": pid}, pidfd)
    finally:
        os.close(pidfd)


def serve(ctl: socket.socket) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    preload = list(PRELOAD)
    while True:
        _reap(ctl)
        idle = 0.0 if preload else None
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [], idle)
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        if ctl.fileno() in ready:
            msg, fd = recv(ctl)
            if msg is None:
                return  # the supervisor closed its end: stop (children follow by PDEATHSIG)
            _spawn(ctl, msg, fd, (wake_r, wake_w))
        elif not ready and preload:
            _preload(preload.pop(0))


def main() -> None:
    die_with_parent()
    try:
        fd = int(os.environ.pop(FORKSERVER_FD_ENV))
    except (KeyError, ValueError):
        sys.stderr.write(f"the fork server is started by butterfly-node ({FORKSERVER_FD_ENV} unset)\n")
        raise SystemExit(2) from None
    ctl = socket.socket(fileno=fd)
    try:
        serve(ctl)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the supervisor went away mid-message: stop (children follow by PDEATHSIG)
    finally:
        ctl.close()


if __name__ == "__main__":
    main()
