"""`butterfly-admin status | watch`: a node's /status for operators and for scripts.

* ``status`` reads one node's ``/status`` and prints it as a table (or the raw JSON with ``--json``).
* ``watch`` follows a starting node: its phase, and a progress bar with bytes, rate and ETA while it
  loads, until it is READY or OPERATIONAL (``--until operational``: until the cluster serves).
  Without a terminal it prints one plain line per change, which is what a log file, a CI job or a
  test reads.

Exit status as ``admin_client`` lists it: 0 ready/answered, 1 node FAILED, 3 unreachable, 4 ``watch``
timed out, 78 bad --config, 130 interrupted.

This module owns rendering a node's state. It must not change anything on the node: it only reads
``/status``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from butterfly.cli.admin_client import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    HTTP_TIMEOUT_S,
    Unreachable,
    add_target,
    fetch_status,
    human_bytes,
    human_seconds,
    make_console,
    print_error,
    resolve_url_or_exit,
)

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

# What `watch --until` waits for: READY is this node loaded and validated (when systemd sees READY=1);
# OPERATIONAL is the cluster's gate committed as well (the node serves).
UNTIL_STATES = {"ready": frozenset({"READY", "OPERATIONAL"}), "operational": frozenset({"OPERATIONAL"})}


# --------------------------------------------------------------------------------------------------
# A /status in words.


def _num(status: Mapping[str, Any], key: str) -> float:
    value = status.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _phase_text(st: Mapping[str, Any]) -> str:
    """``loading_weights/download`` while loading (the step matters then), else the phase alone."""
    phase = str(st.get("phase", "?"))
    step = st.get("load_step")
    if phase == "loading_weights" and step and step != "none":
        return f"{phase}/{step}"
    return phase


def _progress_text(st: Mapping[str, Any]) -> str:
    text = f"{_num(st, 'progress_percent'):.1f}%"
    total = _num(st, "bytes_total")
    if total:
        text += f" ({human_bytes(_num(st, 'bytes_done'))} of {human_bytes(total)}"
        rate = _num(st, "rate_bytes_per_second")
        text += f", {human_bytes(rate)}/s)" if rate else ")"
    return text


def status_line(st: Mapping[str, Any]) -> str:
    """One line in the style of the systemd STATUS= text, with bytes and rate while loading."""
    text = f"{st.get('state', '?')} {_phase_text(st)}"
    if st.get("phase") in ("loading_weights", "validation"):
        text += f" {_num(st, 'progress_percent'):.1f}%"
        total = _num(st, "bytes_total")
        if total:
            text += f" {human_bytes(_num(st, 'bytes_done'))}/{human_bytes(total)}"
        rate = _num(st, "rate_bytes_per_second")
        if rate and st.get("phase") == "loading_weights":
            text += f" {human_bytes(rate)}/s"
        if st.get("eta_seconds") is not None and st.get("phase") == "loading_weights":
            text += f" ETA {human_seconds(st['eta_seconds'])}"
    if st.get("waiting_reason"):
        text += f" (waiting: {st['waiting_reason']})"
    if st.get("last_error"):
        text += f": {st['last_error']}"
    return text


# --------------------------------------------------------------------------------------------------
# status


def _yes(value: object) -> str:
    return "yes" if value is True else "no" if value is False else "?"


def _plan_text(st: Mapping[str, Any]) -> str:
    """Every node's blocks in the current plan, in pipeline order: "n0 0-2, n1 3-7"."""
    plan = st.get("plan")
    if not isinstance(plan, list):
        return ""
    return ", ".join(f"{r.get('node_id')} {r.get('layers')}" for r in plan if isinstance(r, dict))


def _status_tables(st: Mapping[str, Any]) -> list[RenderableType]:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def cell(value: object) -> Text:
        # Text, never markup: an error message may contain "[model]" or other brackets.
        return Text("-" if value is None or value == "" else str(value))

    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    node = (
        f"{st.get('node_id', '?')} ({st.get('cluster_role', '?')}; configured {st.get('role', '?')}, "
        f"version {st.get('version', '?')})"
    )
    state_style = {"FAILED": "bold red", "OPERATIONAL": "bold green", "READY": "green"}
    rows: list[tuple[str, Text]] = [
        ("node", cell(node)),
        ("state", Text(str(st.get("state", "?")), style=state_style.get(str(st.get("state")), "yellow"))),
        ("phase", cell(_phase_text(st))),
        ("progress", cell(_progress_text(st))),
        ("ETA", cell(human_seconds(st.get("eta_seconds")))),
        (
            "cluster size",
            cell(
                f"{st.get('cluster_size', '?')} node(s) ({st.get('cluster_operational_nodes', '?')} "
                f"operational, quorum {st.get('quorum_size', '?')})"
            ),
        ),
        ("coordinator", cell(st.get("coordinator"))),
        ("term", cell(st.get("term"))),
        ("epoch", cell(st.get("epoch"))),
        ("layers", cell(st.get("layers"))),
        ("plan", cell(_plan_text(st))),
        ("model root", cell(st.get("model_root"))),
        ("healthy", cell(f"{_yes(st.get('healthy'))} (may serve: {_yes(st.get('may_serve'))})")),
        ("uptime", cell(human_seconds(st.get("uptime_seconds")))),
        ("waiting", cell(st.get("waiting_reason"))),
        ("last error", Text(str(st.get("last_error") or "-"), style="red" if st.get("last_error") else "")),
    ]
    for name, value in rows:
        t.add_row(name, value)
    out: list[RenderableType] = [t]
    children = st.get("children")
    if isinstance(children, list) and children:
        c = Table(box=box.SIMPLE, pad_edge=False)
        for title in ("child", "pid", "alive", "heartbeat age", "restarts", "last exit"):
            c.add_column(title, no_wrap=title != "last exit")
        for child in children:
            if not isinstance(child, dict):
                continue
            age = child.get("heartbeat_age_seconds")
            c.add_row(
                cell(child.get("name")),
                cell(child.get("pid")),
                Text("yes" if child.get("alive") else "NO", style="" if child.get("alive") else "red"),
                cell(f"{age:.1f}s" if isinstance(age, (int, float)) else None),
                cell(child.get("restarts")),
                cell(child.get("last_exit")),
            )
        out.append(c)
    out += _integrity_tables(st)
    return out


def _integrity_tables(st: Mapping[str, Any]) -> list[RenderableType]:
    """The weights in memory (scrubbing, the last mismatch) and the peers that cannot serve, whole."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out: list[RenderableType] = []
    i = st.get("integrity")
    if isinstance(i, dict):
        line = (
            f"scrubbing {'on' if i.get('scrubbing') else 'off'}: {i.get('scrub_passes', 0)} passes, "
            f"{human_bytes(_num(i, 'scrub_bytes'))} re-hashed; {i.get('mismatches', 0)} mismatches, "
            f"{i.get('repairs', 0)} repairs"
        )
        out.append(Text(line, style="red" if i.get("fault") else ""))
    faults = st.get("peer_faults")
    if isinstance(faults, list) and faults:
        t = Table(box=box.SIMPLE, pad_edge=False, title="peers that cannot serve")
        for title in ("node", "layers", "failed", "reason"):
            t.add_column(title, no_wrap=title != "reason")
        for f in faults:
            if isinstance(f, dict):
                t.add_row(
                    str(f.get("node_id")),
                    str(f.get("layers") or "-"),
                    "yes" if f.get("failed") else "no",
                    Text(str(f.get("reason")), style="red"),
                )
        out.append(t)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    url = resolve_url_or_exit(args)
    if isinstance(url, int):
        return url
    try:
        st = fetch_status(url)
    except Unreachable as e:
        print_error(str(e))
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        console = make_console()
        for table in _status_tables(st):
            console.print(table)
    return EXIT_PROBLEM if st.get("state") == "FAILED" else EXIT_OK


# --------------------------------------------------------------------------------------------------
# watch


@dataclass
class _WatchOutcome:
    code: int
    message: str


class _Watcher:
    """The polling loop shared by the live and the plain view; ``show`` renders one poll's result."""

    def __init__(
        self, url: str, interval: float, timeout: float | None, grace: float, until: frozenset[str]
    ) -> None:
        self.url = url
        self.until = until
        self.interval = interval
        self.timeout = timeout
        self.grace = grace
        self.started = time.monotonic()

    def run(self, show: Callable[[dict[str, Any] | None, str | None], None]) -> _WatchOutcome:
        down_since: float | None = None
        last: dict[str, Any] | None = None
        while True:
            now = time.monotonic()
            try:
                st: dict[str, Any] | None = fetch_status(self.url, timeout=min(HTTP_TIMEOUT_S, self.grace))
                error = None
                down_since = None
            except Unreachable as e:
                st, error = None, str(e)
                down_since = now if down_since is None else down_since
            show(st, error)
            if st is not None:
                last = st
                state = st.get("state")
                if state in self.until:
                    root = st.get("model_root") or "-"
                    return _WatchOutcome(
                        EXIT_OK,
                        f"node {st.get('node_id')} is {state} after {time.monotonic() - self.started:.1f}s "
                        f"(term {st.get('term')}, epoch {st.get('epoch')}, model root {root})",
                    )
                if state == "FAILED":
                    return _WatchOutcome(
                        EXIT_PROBLEM,
                        f"node {st.get('node_id')} FAILED: {st.get('last_error') or 'no reason given'}",
                    )
            elif down_since is not None and time.monotonic() - down_since > self.grace:
                return _WatchOutcome(
                    EXIT_UNREACHABLE, f"node unreachable for more than {self.grace:g}s: {error}"
                )
            elapsed = time.monotonic() - self.started
            if self.timeout is not None and elapsed >= self.timeout:
                where = status_line(last) if last is not None else "never answered"
                return _WatchOutcome(EXIT_TIMEOUT, f"timed out after {self.timeout:g}s; last: {where}")
            pause = self.interval
            if self.timeout is not None:
                pause = min(pause, max(0.0, self.timeout - elapsed))
            time.sleep(pause)


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _watch_plain(watcher: _Watcher) -> _WatchOutcome:
    """One line per change: state, phase, step, waiting reason, error, or another 10% of progress."""
    previous: tuple[Any, ...] | None = None

    def show(st: dict[str, Any] | None, error: str | None) -> None:
        nonlocal previous
        if st is None:
            key: tuple[Any, ...] = ("unreachable",)
            line = f"unreachable: {error}"
        else:
            # Progress counts as a change in steps of 10%, so a long load prints a handful of lines
            # with its rate and ETA instead of one per poll.
            # Numbers inside a waiting reason count up by themselves ("no coordinator for 12.3s"):
            # only a different reason is a change.
            reason = _NUMBER.sub("#", str(st.get("waiting_reason") or ""))
            key = (
                st.get("state"),
                _phase_text(st),
                reason,
                st.get("last_error"),
                int(_num(st, "progress_percent") // 10),
            )
            line = status_line(st)
        if key != previous:
            previous = key
            print(f"+{time.monotonic() - watcher.started:.2f}s {line}", flush=True)

    return watcher.run(show)


def _watch_live(watcher: _Watcher, console: Console) -> _WatchOutcome:
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
    from rich.text import Text

    # The node measures rate and ETA over its own reads; rich's columns would estimate them from our
    # polls instead, so the node's numbers are shown as task fields.
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    )
    task = progress.add_task("starting", total=None, rate="", eta="-")
    header = Text(f"waiting for {watcher.url}")

    def show(st: dict[str, Any] | None, error: str | None) -> None:
        if st is None:
            header.plain = f"{watcher.url}: {error}"
            header.stylize("yellow")
            return
        header.plain = ""
        header.append(str(st.get("state")), style="bold")
        header.append(f"  {_phase_text(st)}  node {st.get('node_id')}  term {st.get('term')}")
        header.append(f"  epoch {st.get('epoch')}  cluster {st.get('cluster_size')}/{st.get('quorum_size')}")
        if st.get("waiting_reason"):
            header.append(f"\nwaiting: {st['waiting_reason']}", style="yellow")
        if st.get("last_error"):
            header.append(f"\nlast error: {st['last_error']}", style="red")
        total = _num(st, "bytes_total")
        rate = _num(st, "rate_bytes_per_second")
        progress.update(
            task,
            description=_phase_text(st),
            total=total or None,
            completed=_num(st, "bytes_done"),
            rate=f"{human_bytes(rate)}/s" if rate else "",
            eta=human_seconds(st.get("eta_seconds")),
        )

    with Live(Group(header, progress), console=console, refresh_per_second=8):
        return watcher.run(show)


def cmd_watch(args: argparse.Namespace) -> int:
    url = resolve_url_or_exit(args)
    if isinstance(url, int):
        return url
    watcher = _Watcher(url, args.interval, args.timeout, args.grace, UNTIL_STATES[args.until])
    console = make_console()
    try:
        outcome = _watch_live(watcher, console) if console.is_terminal else _watch_plain(watcher)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if outcome.code == EXIT_OK:
        print(outcome.message, flush=True)
    else:
        print_error(outcome.message)
    return outcome.code


# --------------------------------------------------------------------------------------------------
# The command line.


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    codes = "Exit status: 0 ok, 1 node FAILED, 3 node unreachable{}, 78 bad --config."
    s = sub.add_parser(
        "status", help="show a node's /status", description="Show a node's /status. " + codes.format("")
    )
    add_target(s)
    s.add_argument("--json", action="store_true", help="print the raw /status JSON")
    s.set_defaults(func=cmd_status)

    w = sub.add_parser(
        "watch",
        help="follow a node until it is READY (phase, progress, rate, ETA)",
        description="Follow a node until READY or OPERATIONAL; without a terminal, one line per change. "
        + codes.format(", 4 --timeout"),
    )
    add_target(w)
    w.add_argument("--interval", type=_positive, default=0.5, metavar="S", help="seconds between polls")
    w.add_argument("--timeout", type=_positive, metavar="S", help="give up (exit 4) after S seconds")
    w.add_argument(
        "--grace",
        type=_positive,
        default=10.0,
        metavar="S",
        help="how long the node may not answer (starting, restarting) before exit 3",
    )
    w.add_argument(
        "--until",
        choices=sorted(UNTIL_STATES),
        default="ready",
        help="ready: READY or OPERATIONAL (the default); operational: wait for the cluster to serve",
    )
    w.set_defaults(func=cmd_watch)
