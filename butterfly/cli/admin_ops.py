"""`butterfly-admin status | watch | diagnose`: a node's state for operators and for scripts.

* ``status`` reads one node's ``/status`` and prints it as a table (or the raw JSON with ``--json``).
* ``watch`` follows a starting node: its phase, and a progress bar with bytes, rate and ETA while it
  loads, until it is READY or OPERATIONAL (``--until operational``: until the cluster serves).
  Without a terminal it prints one plain line per change, which is what a log file, a CI job or a
  test reads.
* ``diagnose`` runs the checks an operator would run by hand before (or after) starting a node from a
  config file: config, ports, peers, DNS SRV, the model source, manifest, cluster secret, disk, GPUs.
  Each prints PASS, FAIL or SKIP with a line saying what was found and, for a FAIL, what to do.

Exit status, the same for every command so scripts can branch on it:

* 0 -- it answered / it became ready / every check passed or was skipped;
* 1 -- the node is FAILED, or a diagnose check failed;
* 2 -- usage error (argparse);
* 3 -- the node is unreachable (nothing answers on the URL, or what answers is not a butterfly node;
  ``watch``: for longer than ``--grace``);
* 4 -- ``watch`` ran past ``--timeout`` before the node was ready;
* 78 (EX_CONFIG) -- the config file given is invalid;
* 130 -- interrupted (Ctrl-C).

This module owns the command-line surface only. It must not change anything on the node or on disk:
``diagnose`` binds a port for an instant to see whether it is free, opens TCP connections to peers
and reads files, nothing more (no cache quarantine, no secret generation).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from butterfly.config import Config, HostPort
    from butterfly.discovery import PeerAddress
    from butterfly.weights.manifest import Manifest

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130
# Restated rather than imported: butterfly.config pulls in blake3, which `status --url` never needs.
EX_CONFIG = 78

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = "/etc/butterfly/node.toml"
# What `watch --until` waits for: READY is this node loaded and validated (when systemd sees READY=1);
# OPERATIONAL is the cluster's gate committed as well (the node serves).
UNTIL_STATES = {"ready": frozenset({"READY", "OPERATIONAL"}), "operational": frozenset({"OPERATIONAL"})}
# A node answers /status from a board read; a few seconds without an answer means it is not there.
HTTP_TIMEOUT_S = 3.0
PEER_CONNECT_TIMEOUT_S = 2.0
# With no manifest to say how big the model is, less free space than this in the cache dir is a FAIL.
LOW_DISK_BYTES = 1 << 30
_WILDCARDS = frozenset({"0.0.0.0", "::"})


def _err(message: str) -> None:
    print(f"butterfly-admin: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Formatting.


def human_bytes(n: float) -> str:
    """Binary units, three significant digits: ``1.8 MiB``, ``512 B``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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


def make_console(stream: Any = None) -> Console:
    from rich.console import Console

    out = stream if stream is not None else sys.stdout
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    # Off a terminal rich wraps at 80 columns; a redirected table should keep a 64-hex model root and
    # an error message on one line each, so it gets room unless COLUMNS says otherwise.
    width = None if is_tty or os.environ.get("COLUMNS") else 200
    return Console(file=out, width=width, highlight=False)


# --------------------------------------------------------------------------------------------------
# Talking to a node.


class Unreachable(Exception):
    """Nothing answered on the URL, or what answered is not a butterfly node's /status."""


def fetch_status(url: str, timeout: float = HTTP_TIMEOUT_S) -> dict[str, Any]:
    """The node's /status as a dict; ``Unreachable`` saying why when there is no usable answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as resp:
            raw = resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        raise Unreachable(f"{url} answered HTTP {e.code} for /status: not a butterfly node?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise Unreachable(f"cannot reach {url}: {reason}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise Unreachable(f"{url}/status is not JSON: not a butterfly node?") from None
    if not isinstance(data, dict) or not isinstance(data.get("state"), str):
        raise Unreachable(f"{url}/status has no node state: not a butterfly node?")
    return data


def url_for(address: HostPort) -> str:
    """The URL to reach an [api] listen address from this host (a wildcard means loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"


def _node_url(args: argparse.Namespace) -> str:
    """``--url``, else the config's [api] listen, else the default. ConfigError escapes to the caller."""
    if args.url:
        return str(args.url).rstrip("/")
    if args.config:
        from butterfly.config import load_config

        return url_for(load_config(args.config).api.listen)
    return DEFAULT_URL


def _resolve_url_or_exit(args: argparse.Namespace) -> str | int:
    from butterfly.config import ConfigError

    try:
        return _node_url(args)
    except ConfigError as e:
        _err(str(e))
        return EX_CONFIG


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
    url = _resolve_url_or_exit(args)
    if isinstance(url, int):
        return url
    try:
        st = fetch_status(url)
    except Unreachable as e:
        _err(str(e))
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
    url = _resolve_url_or_exit(args)
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
        _err(outcome.message)
    return outcome.code


# --------------------------------------------------------------------------------------------------
# diagnose

Verdict = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Check:
    """One check's result: ``message`` says what was found, ``hint`` what to do (FAIL only)."""

    name: str
    status: Verdict
    message: str
    hint: str = ""


def _passed(name: str, message: str) -> Check:
    return Check(name, "PASS", message)


def _failed(name: str, message: str, hint: str = "") -> Check:
    return Check(name, "FAIL", message, hint)


def _skipped(name: str, message: str) -> Check:
    return Check(name, "SKIP", message)


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def _try_bind(host: str, port: int) -> OSError | None:
    """Bind and release ``host:port`` at once; the error when it cannot be bound, else None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return e
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as the node's listeners set it: a port in TIME_WAIT is free for them too, while
        # a port with a listener still refuses (Linux does not share listening ports this way).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            return e
    return None


def _is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this machine: only those can be bound."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def _port_problem(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "in use"
    if e.errno == errno.EADDRNOTAVAIL:
        return "not an address of this host"
    if e.errno == errno.EACCES:
        return "needs privileges to bind (a port below 1024?)"
    return e.strerror or str(e)


class _Diagnosis:
    """Runs the checks in order; later checks use what earlier ones found (the running node, the
    resolved peers, the manifest) instead of asking twice."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.running_node: dict[str, Any] | None = None
        self.peers: list[PeerAddress] | None = None
        self.discovery_error: str | None = None
        self.source_ok = False
        self.manifest: Manifest | None = None

    def run(self) -> list[Check]:
        return [
            self.api_port(),
            self.cluster_port(),
            self.peers_reachable(),
            self.dns_srv(),
            self.model_source(),
            self.manifest_present(),
            self.secret(),
            self.disk(),
            self.gpu(),
        ]

    def api_port(self) -> Check:
        name = "api port"
        listen = self.config.api.listen
        problem = _try_bind(listen.host, listen.port)
        if problem is None:
            return _passed(name, f"{listen} is free")
        if problem.errno != errno.EADDRINUSE:
            return _failed(
                name, f"{listen}: {_port_problem(problem)}", "set [api] listen to an address of this host"
            )
        try:
            st = fetch_status(url_for(listen))
        except Unreachable:
            return _failed(
                name,
                f"{listen} is in use by a program that is not a butterfly node",
                "stop that program or set [api] listen to another port",
            )
        if st.get("node_id") != self.config.node.id:
            return _failed(
                name,
                f"{listen} is held by butterfly node {st.get('node_id')}, "
                f"not this config's node {self.config.node.id}",
                "each node on a host needs its own [api] listen port",
            )
        self.running_node = st
        return _passed(name, f"{listen} answered by this node ({st.get('node_id')}, {st.get('state')})")

    def cluster_port(self) -> Check:
        name = "cluster port"
        bind = self.config.node.bind_address
        problem = _try_bind(bind.host, bind.port)
        if problem is None:
            return _passed(name, f"{bind} is free")
        if problem.errno == errno.EADDRINUSE and self.running_node is not None:
            # The node answering on our API port has our node id: it is what holds the transport port.
            return _passed(name, f"{bind} is held by this node ({self.running_node.get('node_id')})")
        hint = (
            "stop the program holding it or set [node] bind_address to another port"
            if problem.errno == errno.EADDRINUSE
            else "set [node] bind_address to an address of this host (0.0.0.0 for all)"
        )
        return _failed(name, f"{bind}: {_port_problem(problem)}", hint)

    def _is_self(self, peer: PeerAddress) -> bool:
        node = self.config.node
        if node.advertise_address is not None and peer.address == node.advertise_address:
            return True
        if peer.port != node.bind_address.port:
            return False
        return peer.host == node.bind_address.host or (
            node.bind_address.host in _WILDCARDS and _is_local_address(peer.host)
        )

    def _resolve(self) -> None:
        from butterfly.discovery import DiscoveryError, make_provider

        async def resolve() -> list[PeerAddress]:
            provider = make_provider(self.config)
            try:
                return await asyncio.wait_for(provider.resolve(), timeout=10.0)
            finally:
                await provider.close()

        try:
            self.peers = asyncio.run(resolve())
        except (DiscoveryError, TimeoutError, OSError) as e:
            self.discovery_error = str(e) or type(e).__name__

    def peers_reachable(self) -> Check:
        name = "peers"
        cluster = self.config.cluster
        if cluster.discovery_method == "static" and not cluster.seed_nodes:
            return _skipped(name, "no seed_nodes: this node forms a cluster of its own")
        self._resolve()
        if self.peers is None:
            return _failed(
                name,
                f"{cluster.discovery_method} discovery failed: {self.discovery_error}",
                "check the [cluster] discovery settings and that the discovery service answers",
            )
        others = [p for p in self.peers if not self._is_self(p)]
        if not others:
            why = "only this node is listed" if self.peers else "discovery found no peers"
            return _skipped(name, f"{why} ({cluster.discovery_method})")
        results = asyncio.run(_connect_all(others))
        down = [f"{p.address} ({why})" for p, why in zip(others, results, strict=True) if why is not None]
        if down:
            return _failed(
                name,
                f"{len(down)} of {len(others)} unreachable: {', '.join(down)}",
                "start those nodes, or check the addresses and that firewalls let TCP through to them",
            )
        return _passed(name, f"{len(others)} reachable: {', '.join(str(p.address) for p in others)}")

    def dns_srv(self) -> Check:
        name = "dns srv"
        cluster = self.config.cluster
        if cluster.discovery_method != "dns":
            return _skipped(name, f'discovery_method is "{cluster.discovery_method}"')
        servers = ", ".join(str(s) for s in cluster.dns_servers) or "the system resolver"
        if self.peers is None and self.discovery_error is None:
            self._resolve()
        if self.peers is None:
            return _failed(
                name,
                f"{cluster.dns_srv_name} via {servers}: {self.discovery_error}",
                "check [cluster] dns_servers and that the name server answers",
            )
        if not self.peers:
            return _failed(
                name,
                f"no SRV records (or none with an address) for {cluster.dns_srv_name} via {servers}",
                "publish an SRV record per node: priority weight port target, with A/AAAA for each target",
            )
        shown = ", ".join(str(p.address) for p in self.peers)
        return _passed(name, f"{cluster.dns_srv_name}: {len(self.peers)} targets ({shown})")

    def model_source(self) -> Check:
        model = self.config.model
        if model.source_type == "filesystem":
            name = "model dir"
            root = Path(model.source_path)
            hint = "set [model] source_path to the directory holding config.json and the *.safetensors files"
            if not root.is_dir():
                return _failed(name, f"{root} does not exist or is not a directory", hint)
            if not os.access(root, os.R_OK | os.X_OK):
                return _failed(
                    name, f"{root} is not readable by this user", "make it readable by the service user"
                )
            config_json = root / "config.json"
            if not config_json.is_file():
                return _failed(name, f"no config.json in {root}", hint)
            if not os.access(config_json, os.R_OK):
                return _failed(name, f"{config_json} is not readable by this user", "fix its permissions")
            self.source_ok = True
            return _passed(name, f"{root} readable, config.json present")
        return self._s3_source()

    def _s3_source(self) -> Check:
        from butterfly.weights.sources import SourceError
        from butterfly.weights.sources.s3 import S3Source

        name = "s3"
        model = self.config.model
        # Our own S3Source rather than open_source's: no retries and short timeouts, so an endpoint
        # that does not answer costs seconds here, not the loader's full retry schedule.
        try:
            src = S3Source(
                model.source_path,
                endpoint_url=model.s3.endpoint_url,
                region=model.s3.region,
                path_style=model.s3.path_style,
                retries=0,
                connect_timeout_s=3.0,
                read_timeout_s=5.0,
            )
        except Exception as e:  # boto3 refuses a bad region or endpoint while building the client
            return _failed(name, f"cannot set up an S3 client: {e}", "check [model.s3]")
        try:
            size = src.size("config.json")
        except SourceError as e:
            return _failed(
                name,
                str(e),
                "check [model.s3] endpoint_url/region/path_style, the bucket and prefix, and the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or /etc/butterfly/node.env for the service)",
            )
        except Exception as e:  # botocore raises its own types for missing credentials and bad URLs
            return _failed(name, f"{type(e).__name__}: {e}", "check the S3 credentials and [model.s3]")
        finally:
            src.close()
        self.source_ok = True
        return _passed(
            name, f"{src.url('config.json')} readable ({size} bytes) with the configured credentials"
        )

    def manifest_present(self) -> Check:
        from butterfly.weights.manifest import ManifestError
        from butterfly.weights.modelsource import NoManifest, load_manifest
        from butterfly.weights.provenance import ManifestRefused
        from butterfly.weights.sources import SourceError

        name = "manifest"
        model = self.config.model
        on_source = model.manifest_path is None or model.manifest_path.startswith("s3://")
        if on_source and not self.source_ok:
            # Reading it would meet the same failure the source check reported (and S3 would retry).
            return _skipped(name, "the model source is not readable (see above)")
        hint = "build one: `butterfly-admin manifest build MODEL_DIR`, and publish it beside the weights"
        try:
            manifest = load_manifest(self.config)
        except NoManifest as e:
            return _failed(name, str(e), hint)
        except ManifestRefused as e:
            return _failed(
                name,
                str(e),
                "check the manifest with `butterfly-admin manifest show` and `manifest verify --config`",
            )
        except (ManifestError, SourceError, OSError) as e:
            return _failed(name, f"cannot read the manifest: {e}", hint)
        except Exception as e:  # a malformed manifest may fail inside msgspec with its own error types
            return _failed(name, f"cannot parse the manifest: {type(e).__name__}: {e}", hint)
        self.manifest = manifest
        return _passed(
            name,
            f"root {manifest.merkle_root[:16]}..., {manifest.num_blocks} blocks, "
            f"{len(manifest.files)} files, {human_bytes(manifest.total_bytes)}",
        )

    def secret(self) -> Check:
        from butterfly.net.auth import SecretError, load_secret

        name = "cluster secret"
        path = self.config.security.secret_file
        try:
            key = load_secret(path)
        except SecretError as e:
            hint = "every node of the cluster needs the same file, readable by the service user only"
            if not os.access(path, os.R_OK) and path.exists():
                hint = "run diagnose as root or as the service user (butterfly)"
            return _failed(name, str(e), hint)
        return _passed(name, f"{path} readable and long enough ({len(key)} key bytes)")

    def _missing_bytes(self, manifest: Manifest) -> tuple[int, int]:
        """(bytes the cache still lacks, bytes it already holds) for the manifest's tensors; read-only."""
        from butterfly.weights.cache import WeightCache

        cache = WeightCache(self.config.node.cache_dir, create=False)
        missing = held = 0
        for digest, length in {t.blake3: t.length for t in manifest.tensors}.items():
            try:
                st = os.stat(cache.path_of(digest), follow_symlinks=False)
            except (OSError, ValueError):
                st = None
            if st is not None and st.st_size == length:
                held += length
            else:
                missing += length
        return missing, held

    def disk(self) -> Check:
        name = "disk"
        cache_dir = self.config.node.cache_dir
        # The cache dir may not exist before the first start (systemd's CacheDirectory= makes it):
        # the free space that counts is that of the filesystem it will be on.
        where = cache_dir
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = shutil.disk_usage(where).free
        except OSError as e:
            return _failed(name, f"cannot stat {where}: {e.strerror or e}", "check [node] cache_dir")
        hint = "free space there or set [node] cache_dir to a larger disk"
        if self.manifest is None:
            if free < LOW_DISK_BYTES:
                return _failed(
                    name,
                    f"{cache_dir}: only {human_bytes(free)} free (model size unknown: no manifest)",
                    hint,
                )
            return _passed(name, f"{cache_dir}: {human_bytes(free)} free (model size unknown: no manifest)")
        missing, held = self._missing_bytes(self.manifest)
        model = missing + held
        # The node caches only its own layer range: the running node knows its range's size; before
        # the plan, an even share over quorum_size nodes (what the loader itself first assumes).
        running_total = int((self.running_node or {}).get("bytes_total") or 0)
        nodes = max(1, self.config.cluster.quorum_size)
        if running_total > 0:
            need, basis = min(running_total, model), "its layer range (from the running node)"
        elif nodes == 1:
            need, basis = model, "the whole model (quorum_size 1)"
        else:
            need, basis = -(-model // nodes), f"its share, about 1/{nodes} of the model (quorum_size {nodes})"
        more = max(0, min(missing, need - held))
        text = (
            f"{cache_dir}: {human_bytes(free)} free; this node caches {basis}, {human_bytes(need)}: "
            f"it needs {human_bytes(more)} more ({human_bytes(held)} already cached)"
        )
        return _passed(name, text) if free >= more else _failed(name, text, hint)

    def gpu(self) -> Check:
        from butterfly.hardware import detect

        name = "gpu"
        mode = self.config.node.gpu
        if mode == "off":
            return _skipped(name, "[node] gpu = off: CPU path")
        gpus = detect(mode).gpus
        if not gpus:
            if mode == "required":
                return _failed(
                    name,
                    "[node] gpu = required but no GPU was found",
                    "install the gpu extra (cupy-cuda12x) and a CUDA driver, or set gpu = auto",
                )
            return _skipped(name, "no GPU: CPU path")
        memory = sum(g.memory_bytes for g in gpus)
        listed = ", ".join(f"{g.index}: {g.name} {human_bytes(g.memory_bytes)}" for g in gpus)
        if self.manifest is None:
            return _passed(name, f"{len(gpus)} GPUs ({listed}); model size unknown")
        # Weights are split over the quorum's nodes; this node holds about its share of them. That is
        # a floor: activations and the KV cache need room on top.
        share = self.manifest.total_bytes // max(1, self.config.cluster.quorum_size)
        text = (
            f"{len(gpus)} GPUs ({listed}), {human_bytes(memory)} in all; "
            f"this node's share of the weights is ~{human_bytes(share)}"
        )
        if memory < share:
            return _failed(name, text, "add nodes (quorum_size) or GPUs with more memory")
        return _passed(name, text)


async def _connect_all(peers: list[PeerAddress]) -> list[str | None]:
    """Open (and at once close) a TCP connection to each peer, all at the same time; why each failed."""

    async def one(peer: PeerAddress) -> str | None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(peer.host, peer.port), timeout=PEER_CONNECT_TIMEOUT_S
            )
        except TimeoutError:
            return f"no answer within {PEER_CONNECT_TIMEOUT_S:g}s"
        except OSError as e:
            # asyncio words a refusal as "Connect call failed (addr)"; the errno's own text is clearer.
            return os.strerror(e.errno) if e.errno else str(e)
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return None

    return list(await asyncio.gather(*(one(p) for p in peers)))


def _print_checks(checks: list[Check], console: Console) -> None:
    from rich.text import Text

    styles = {"PASS": "green", "FAIL": "bold red", "SKIP": "dim"}
    width = max(len(c.name) for c in checks)
    for c in checks:
        line = Text.assemble((c.status, styles[c.status]), "  ", c.name.ljust(width), "  ", c.message)
        console.print(line, soft_wrap=True)
        if c.hint:
            console.print(Text(" " * (width + 8) + "hint: " + c.hint, style="yellow"), soft_wrap=True)


def cmd_diagnose(args: argparse.Namespace) -> int:
    from butterfly.config import ConfigError, load_config

    console = make_console()
    try:
        config = load_config(args.config)
    except ConfigError as e:
        check = _failed(
            "config", str(e), "fix the value named above; butterfly-node refuses to start with it (exit 78)"
        )
        if args.json:
            print(json.dumps({"config": args.config, "checks": [asdict(check)]}, indent=2))
        else:
            _print_checks([check], console)
        return EX_CONFIG
    node = config.node
    checks = [
        _passed(
            "config",
            f"{args.config}: node {node.id} ({node.role}), {config.cluster.discovery_method} discovery, "
            f"{config.model.source_type} source",
        )
    ]
    checks += _Diagnosis(config).run()
    failed = sum(c.status == "FAIL" for c in checks)
    if args.json:
        print(json.dumps({"config": args.config, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        _print_checks(checks, console)
        counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "FAIL", "SKIP")}
        console.print(", ".join(f"{n} {s}" for s, n in counts.items()), soft_wrap=True)
    return EXIT_PROBLEM if failed else EXIT_OK


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


def _add_target(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help=f"the node's API, like {DEFAULT_URL} (the default)")
    where.add_argument("--config", metavar="FILE", help="the node's config: its [api] listen address")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    codes = "Exit status: 0 ok, 1 node FAILED, 3 node unreachable{}, 78 bad --config."
    s = sub.add_parser(
        "status", help="show a node's /status", description="Show a node's /status. " + codes.format("")
    )
    _add_target(s)
    s.add_argument("--json", action="store_true", help="print the raw /status JSON")
    s.set_defaults(func=cmd_status)

    w = sub.add_parser(
        "watch",
        help="follow a node until it is READY (phase, progress, rate, ETA)",
        description="Follow a node until READY or OPERATIONAL; without a terminal, one line per change. "
        + codes.format(", 4 --timeout"),
    )
    _add_target(w)
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

    d = sub.add_parser(
        "diagnose",
        help="check a node's config, ports, peers, model source, secret, disk and GPUs",
        description="Run the node's start-up checks from its config; each prints PASS, FAIL or SKIP. "
        "Exit status: 0 no FAIL, 1 a check failed, 78 the config is invalid.",
    )
    d.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"default {DEFAULT_CONFIG}")
    d.add_argument("--json", action="store_true", help="the checks as JSON")
    d.set_defaults(func=cmd_diagnose)
