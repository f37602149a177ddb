"""What every ``butterfly-admin`` command that talks to a node shares: reaching its API and reporting.

* where the node is: ``--url``, else the ``[api] listen`` address of ``--config``, else the default;
* reading its ``/status`` (``Unreachable`` when nothing usable answers);
* the exit status every command uses, so scripts can branch on it:

  * 0 -- it answered / it became ready / every check passed or was skipped;
  * 1 -- the node is FAILED, or a diagnose check failed;
  * 2 -- usage error (argparse);
  * 3 -- the node is unreachable (nothing answers on the URL, or what answers is not a butterfly node;
    ``watch``: for longer than ``--grace``);
  * 4 -- ``watch`` ran past ``--timeout`` before the node was ready;
  * 78 (EX_CONFIG) -- the config file given is invalid;
  * 130 -- interrupted (Ctrl-C);

* the console and the units (bytes, seconds) the reports print with.

The commands themselves live beside it: ``admin_status`` (status, watch), ``admin_diagnose``,
``admin_generate``. This module must not change anything on the node or on disk: it only reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from butterfly.config import HostPort

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130
# Restated rather than imported: butterfly.config pulls in blake3, which `status --url` never needs.
EX_CONFIG = 78

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_CONFIG = "/etc/butterfly/node.toml"
# A node answers /status from a board read; a few seconds without an answer means it is not there.
HTTP_TIMEOUT_S = 3.0


def print_error(message: str) -> None:
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
    # ``timeout`` bounds each socket operation; the deadline bounds the whole answer, so a server that
    # trickles a byte at a time cannot keep a command (or a node start's port check) waiting for ever.
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as resp:
            chunks: list[bytes] = []
            size = 0
            while size < 1 << 20:
                if time.monotonic() > deadline:
                    raise Unreachable(f"{url} did not send its whole /status within {timeout:g}s")
                chunk = resp.read1(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            raw = b"".join(chunks)
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


def node_api_url(value: str) -> str:
    """``--url`` as given, checked: http(s), a host, a port that exists, nothing urllib would refuse
    later with a traceback (spaces, control characters), no query or fragment. A path is kept (a
    node behind a proxy's prefix); a trailing slash is dropped."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise argparse.ArgumentTypeError(f"{value!r} contains spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        hint = f": did you mean http://{value}?" if "://" not in value else ""
        raise argparse.ArgumentTypeError(f"{value!r} is not an http:// or https:// URL{hint}")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} names no host (like {DEFAULT_URL})")
    if port == 0:
        raise argparse.ArgumentTypeError(f"{value!r}: port 0 is not a port a node listens on")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise argparse.ArgumentTypeError(f"{value!r}: give the API's base URL, without ? or #")
    return value.rstrip("/")


def add_target(p: argparse.ArgumentParser) -> None:
    """``--url`` or ``--config``: which node a command talks to."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", type=node_api_url, help=f"the node's API, like {DEFAULT_URL} (the default)")
    where.add_argument("--config", metavar="FILE", help="the node's config: its [api] listen address")


def _node_url(args: argparse.Namespace) -> str:
    """``--url``, else the config's [api] listen, else the default. ConfigError escapes to the caller."""
    if args.url:
        return str(args.url)
    if args.config:
        from butterfly.config import load_config

        return url_for(load_config(args.config).api.listen)
    return DEFAULT_URL


def resolve_url_or_exit(args: argparse.Namespace) -> str | int:
    from butterfly.config import ConfigError

    try:
        return _node_url(args)
    except ConfigError as e:
        print_error(str(e))
        return EX_CONFIG
