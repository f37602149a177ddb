"""The node's configuration: one typed, frozen ``Config`` that every other part of the node reads.

This module owns the TOML schema (sections, keys, defaults and what each one means), validating a
file into frozen dataclasses at start-up, the command-line overrides (``--role``, ``--seed-nodes``)
and writing the effective configuration back out as TOML. Every bad input becomes one
``ConfigError`` naming the file, the key path, what was expected and what was found; the caller
prints it and exits with ``EX_CONFIG``.

Each setting is declared once, as a dataclass field whose metadata holds its check and whose
default is the default; parsing, overrides and ``to_toml`` are all driven by those declarations.

It must not do I/O beyond reading the one config file: it does not check that paths exist,
resolve host names or open sockets (those fail later, where the node can say what it was doing).
It holds no mutable state.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import urlsplit

import blake3

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

EX_CONFIG = 78
"""sysexits.h EX_CONFIG: the exit status for "the configuration is wrong" (systemd shows it by name)."""

DiscoveryMethod = Literal["static", "dns", "consul"]
SourceType = Literal["s3", "filesystem"]
Role = Literal["worker", "coordinator"]
GpuMode = Literal["auto", "off", "required"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "text", "journal"]


class ConfigError(Exception):
    """A configuration the node must not start with.

    ``path`` is the file (or ``"<string>"``), ``key`` the dotted key path (``"cluster.quorum_size"``,
    a flag such as ``"--seed-nodes"``, or None when the file as a whole is at fault), ``expected``
    and ``found`` are phrases that complete "expected ..., found ...". ``line``/``column`` are set
    for TOML syntax errors.
    """

    def __init__(
        self,
        path: str,
        key: str | None,
        expected: str,
        found: str,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.path = path
        self.key = key
        self.expected = expected
        self.found = found
        self.line = line
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.key}: " if self.key else ""
        return f"config error in {self.path}: {where}expected {self.expected}, found {self.found}"


class HostPort(NamedTuple):
    """A validated ``host:port``; ``host`` is a hostname, an IPv4 or an IPv6 address (no brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_PORT_EXPECTED = "host:port (a hostname, IPv4 or [IPv6] address, and a port 1..65535)"
_LABEL_PATTERN = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_LABEL = re.compile(_LABEL_PATTERN)
_SRV_NAME_PATTERN = rf"_[A-Za-z0-9-]{{1,63}}\._(tcp|udp)\.{_LABEL_PATTERN}(\.{_LABEL_PATTERN})*\.?"
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")
_PORT = re.compile(r"[0-9]{1,5}")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _check_hostname(host: str) -> None:
    if not host:
        raise ValueError("the host is empty")
    if _DOTTED_NUMBERS.fullmatch(host):
        # All digits and dots reads as an IPv4 address to every resolver, so it must be a valid one.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host} is not a valid IPv4 address") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{host} is not a valid hostname")


def parse_host_port(text: str) -> HostPort:
    """Parse ``host:port``, ``a.b.c.d:port`` or ``[v6]:port``; raise ValueError saying what is wrong."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("'[' opens an IPv6 address but there is no ']'")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError("the port is missing")
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ValueError("an IPv6 address must be written in brackets, like [::1]:7000")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("the port is missing")
        _check_hostname(host)
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port {port_text or '(empty)'} is not a number from 1 to 65535")
    return HostPort(host, int(port_text))


def default_node_id(hostname: str, bind_address: HostPort) -> str:
    """``<short hostname>-<4 hex>``: stable across restarts, distinct for two nodes on one host."""
    short = re.sub(r"[^A-Za-z0-9_-]", "-", hostname.split(".")[0])[:58] or "node"
    digest = blake3.blake3(f"{hostname}\0{bind_address}".encode()).hexdigest()
    return f"{short}-{digest[:4]}"


# --------------------------------------------------------------------------------------------------
# Checks: each turns a raw TOML value into the typed value or raises ConfigError for ``key``.


@dataclass(frozen=True)
class _Context:
    source: str
    base_dir: Path

    def error(self, key: str, expected: str, found: str) -> ConfigError:
        return ConfigError(self.source, key, expected, found)


_Check = Callable[[object, str, _Context], Any]


def _literal(value: object) -> str:
    """A value as TOML would write it, shortened so one error stays on one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, list):
        text = "[" + ", ".join(_literal(v) for v in value) + "]"
    elif isinstance(value, dict):
        text = "a table"
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _typed(value: object) -> str:
    """A value with its TOML type named, for "wrong type" errors."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a float"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        kind = "an array"
    else:
        kind = "a date/time"
    return f"{kind} {_literal(value)}"


def _size(count: int) -> str:
    unit = "MiB" if count >= 1 << 20 else "KiB"
    return f"{count} ({count >> (20 if unit == 'MiB' else 10)} {unit})"


def _string(expected: str, pattern: str | None = None) -> _Check:
    regex = re.compile(pattern) if pattern is not None else None

    def check(value: object, key: str, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise ctx.error(key, expected, _typed(value))
        if (regex is not None and not regex.fullmatch(value)) or not value:
            raise ctx.error(key, expected, _literal(value))
        return value

    return check


def _choice(*choices: str) -> _Check:
    expected = "one of " + ", ".join(json.dumps(c) for c in choices)

    def check(value: object, key: str, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise ctx.error(key, expected, _typed(value))
        if value not in choices:
            raise ctx.error(key, expected, _literal(value))
        return value

    return check


def _integer(minimum: int, maximum: int | None = None, *, power_of_two: bool = False) -> _Check:
    if power_of_two:
        expected = f"a power of two from {_size(minimum)} to {_size(maximum or minimum)}"
    elif maximum is None:
        expected = f"an integer >= {minimum}"
    else:
        expected = f"an integer from {minimum} to {maximum}"

    def check(value: object, key: str, ctx: _Context) -> int:
        # bool is an int subclass in Python; `quorum_size = true` must not read as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, expected, _typed(value))
        in_range = value >= minimum and (maximum is None or value <= maximum)
        if not in_range or (power_of_two and value & (value - 1)):
            raise ctx.error(key, expected, _literal(value))
        return value

    return check


def _number(minimum: float, *, inclusive: bool, maximum: float | None = None) -> _Check:
    expected = f"a number {'>=' if inclusive else '>'} {minimum:g}"
    if maximum is not None:
        expected = f"a number {'from' if inclusive else 'above'} {minimum:g} to {maximum:g}"

    def check(value: object, key: str, ctx: _Context) -> float:
        # TOML writes 10 and 10.0 differently; an operator means the same number by both.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(key, expected, _typed(value))
        number = float(value)
        if not math.isfinite(number) or number < minimum or (number == minimum and not inclusive):
            raise ctx.error(key, expected, _literal(value))
        if maximum is not None and number > maximum:
            raise ctx.error(key, expected, _literal(value))
        return number

    return check


def _boolean(value: object, key: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise ctx.error(key, "true or false", _typed(value))
    return value


def _host_port(value: object, key: str, ctx: _Context) -> HostPort:
    if not isinstance(value, str):
        raise ctx.error(key, _HOST_PORT_EXPECTED, _typed(value))
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise ctx.error(key, _HOST_PORT_EXPECTED, f"{_literal(value)} ({exc})") from None


def _advertise_address(value: object, key: str, ctx: _Context) -> HostPort:
    address = _host_port(value, key, ctx)
    if address.host in _WILDCARD_HOSTS:
        # Peers dial this address; a wildcard would make them dial themselves.
        raise ctx.error(key, "an address peers can reach (not a wildcard)", _literal(value))
    return address


def _list_of(item: _Check, expected: str) -> _Check:
    def check(value: object, key: str, ctx: _Context) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ctx.error(key, f"an array of {expected}", _typed(value))
        items = []
        for index, raw in enumerate(value, start=1):
            try:
                parsed = item(raw, key, ctx)
            except ConfigError as exc:
                raise ctx.error(key, exc.expected, f"entry {index}: {exc.found}") from None
            if parsed in items:
                raise ctx.error(key, "no duplicate entries", f"entry {index}: {_literal(raw)} again")
            items.append(parsed)
        return tuple(items)

    return check


def _dns_server(value: object, key: str, ctx: _Context) -> HostPort:
    expected = "ip or ip:port (port 53 when left out; IPv6 with a port as [ip]:port)"
    if not isinstance(value, str):
        raise ctx.error(key, expected, _typed(value))
    try:
        return HostPort(str(ipaddress.ip_address(value)), 53)
    except ValueError:
        pass
    try:
        address = parse_host_port(value)
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ctx.error(key, expected, _literal(value)) from None
    return address


def _path(value: object, key: str, ctx: _Context) -> Path:
    expected = "a path (relative paths are taken from the config file's directory)"
    if not isinstance(value, str):
        raise ctx.error(key, expected, _typed(value))
    if not value or "\0" in value:
        raise ctx.error(key, expected, _literal(value))
    path = Path(value)
    # The daemon may chdir; resolving now pins the path to where the operator wrote it.
    return path if path.is_absolute() else ctx.base_dir / path


def _url(value: object, key: str, ctx: _Context) -> str:
    expected = "an http:// or https:// URL with a host"
    if not isinstance(value, str):
        raise ctx.error(key, expected, _typed(value))
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port outside 0..65535 or not a number
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        valid = valid and not parts.query and not parts.fragment
    except ValueError:
        valid = False
    if not valid:
        raise ctx.error(key, expected, _literal(value))
    return value


_S3_URL = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([^/].*)")
_S3_EXPECTED = (
    's3://bucket/prefix (bucket: 3-63 of a-z 0-9 . -; a non-empty prefix), like "s3://models/llama"'
)


def _s3_url(value: str, key: str, ctx: _Context) -> str:
    match = _S3_URL.fullmatch(value)
    prefix = match.group(2).rstrip("/") if match else ""
    if match is None or not prefix:
        raise ctx.error(key, _S3_EXPECTED, _literal(value))
    # A trailing slash names the same prefix; dropping it keeps equal configs equal.
    return f"s3://{match.group(1)}/{prefix}"


def _ed25519_public_key(value: object, key: str, ctx: _Context) -> str:
    expected = "an Ed25519 public key in base64 (the line `butterfly-admin manifest keygen` prints)"
    if not isinstance(value, str):
        raise ctx.error(key, expected, _typed(value))
    from butterfly.weights.provenance import parse_public_key

    try:
        parse_public_key(value)
    except ValueError as exc:
        raise ctx.error(key, expected, f"{_literal(value)} ({exc})") from None
    return value.strip()


def _setting(check: _Check, default: Any = dataclasses.MISSING, *, derived: bool = False) -> Any:
    """Declare a key: its check, and its default (none = required, unless ``derived`` by a hook)."""
    metadata = {"check": check, "derived": derived}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def _table(cls: type, *, defaulted: bool = False) -> Any:
    """Declare a sub-table (``[model.s3]``) or a section of the file; ``defaulted``: ``cls()`` when
    the table is absent (only for tables whose keys all have defaults)."""
    if defaulted:
        return field(default_factory=cls, metadata={"table": cls})
    return field(metadata={"table": cls})


# --------------------------------------------------------------------------------------------------
# The schema. Field order is the order ``to_toml`` writes.


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: which cluster this node belongs to and how it finds its peers."""

    cluster_name: str = _setting(_string("1-63 of a-z 0-9 -", r"[a-z0-9-]{1,63}"), "butterfly")
    """Name shared by every node of one cluster; nodes of another cluster are refused."""
    discovery_method: DiscoveryMethod = _setting(_choice("static", "dns", "consul"), "static")
    """How peers are found: the ``seed_nodes`` list, a DNS SRV record, or a Consul service."""
    seed_nodes: tuple[HostPort, ...] = _setting(_list_of(_host_port, _HOST_PORT_EXPECTED), ())
    """Peers to contact first (static discovery); ``--seed-nodes`` replaces the list."""
    quorum_size: int = _setting(_integer(1), 1)
    """Nodes that must be up before an election, and for the cluster to stay operational."""
    dns_srv_name: str | None = _setting(
        _string('an SRV name like "_butterfly._tcp.example.com"', _SRV_NAME_PATTERN), None
    )
    """SRV record listing the peers; required when ``discovery_method = "dns"``."""
    dns_servers: tuple[HostPort, ...] = _setting(_list_of(_dns_server, "IP addresses"), ())
    """Name servers to ask for the SRV record (``ip`` or ``ip:port``); empty: the system resolver."""
    consul_address: str = _setting(_url, "http://127.0.0.1:8500")
    """Consul agent HTTP address (consul discovery)."""
    consul_service: str = _setting(
        _string("a Consul service name (1-63 of A-Z a-z 0-9 -)", r"[A-Za-z0-9][A-Za-z0-9-]{0,62}"),
        "butterfly",
    )
    """Consul service the nodes register as and look up (consul discovery)."""
    discovery_interval_s: float = _setting(_number(0, inclusive=False), 5.0)
    """Seconds between discovery rounds."""
    founder: HostPort | None = _setting(_host_port, None)
    """The one node that founds a new cluster (writes its first voter set), named by the address it
    advertises. Unset: the lowest of ``seed_nodes`` plus a coordinator's own address, so every
    coordinator must list the same set (workers never found unless named here). Needed with dns or
    consul discovery. Nodes that already hold Raft state ignore it."""
    voter_grace_s: float = _setting(_number(0, inclusive=False), 30.0)
    """A voter silent this long is replaced by a live learner, a coordinator-eligible one first (one
    change at a time through the Raft log)."""


@dataclass(frozen=True)
class S3Config:
    """``[model.s3]``: how to reach an S3-compatible store; credentials come from the environment."""

    endpoint_url: str | None = _setting(_url, None)
    """Endpoint of a non-AWS store (MinIO, Ceph); unset: AWS."""
    region: str | None = _setting(_string('a region name like "us-east-1"', r"[A-Za-z0-9_-]{1,63}"), None)
    """Region to sign requests for; unset: the SDK's default."""
    path_style: bool = _setting(_boolean, False)
    """Address buckets as ``endpoint/bucket`` instead of ``bucket.endpoint`` (most on-prem stores)."""


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: where the weights come from."""

    source_type: SourceType = _setting(_choice("s3", "filesystem"))
    """``"s3"`` or ``"filesystem"`` (a local or mounted directory)."""
    source_path: str = _setting(_string("an s3://bucket/prefix URL or a directory, as source_type says"))
    """``s3://bucket/prefix`` for s3; a directory for filesystem (made absolute when loaded)."""
    manifest_path: str | None = _setting(_string("a path or an s3://bucket/key URL"), None)
    """Manifest naming the model version (``butterfly-admin manifest build``): a path or s3:// URL."""
    expected_root: str | None = _setting(
        _string("the 64 lowercase hex digits of a manifest's root", r"[0-9a-f]{64}"), None
    )
    """Model version this node accepts (``butterfly-admin manifest show`` prints it); unset: any."""
    manifest_public_key: str | None = _setting(_ed25519_public_key, None)
    """Ed25519 key (base64, ``butterfly-admin manifest keygen``) that must sign the manifest; unset: none."""
    s3: S3Config = _table(S3Config, defaulted=True)
    """``[model.s3]`` options; ignored for a filesystem source."""


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: this machine's identity, addresses and local resources."""

    id: str = _setting(_string("1-63 of A-Z a-z 0-9 . _ -", r"[A-Za-z0-9._-]{1,63}"), derived=True)
    """Node id in logs, /status and Raft; unset: ``<short hostname>-<4 hex of hostname+bind_address>``."""
    role: Role = _setting(_choice("worker", "coordinator"), "worker")
    """``"coordinator"`` may stand for election; ``"worker"`` only serves layers (``--role``)."""
    bind_address: HostPort = _setting(_host_port, HostPort("0.0.0.0", 7000))
    """Where the cluster transport listens."""
    advertise_address: HostPort | None = _setting(_advertise_address, None)
    """Address peers dial; unset: derived from ``bind_address`` and the host's interfaces."""
    state_dir: Path = _setting(_path, Path("/var/lib/butterfly"))
    """Raft log, term and vote (fsync'd); must survive restarts."""
    cache_dir: Path = _setting(_path, Path("/var/butterfly/models"))
    """Content-addressed weight cache (``butterfly-admin clear-cache`` empties it)."""
    gpu: GpuMode = _setting(_choice("auto", "off", "required"), "auto")
    """``"auto"``: use GPUs when found; ``"off"``: CPU only; ``"required"``: fail without one."""
    memory_reserve_bytes: int = _setting(_integer(0), 1 << 30)
    """Host memory kept free for the OS and others; the planner sees total minus this."""


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the HTTP endpoint for /status, /health, /ready and /metrics."""

    listen: HostPort = _setting(_host_port, HostPort("127.0.0.1", 8080))
    """Address the HTTP API listens on."""


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``: verbosity and where log lines go (see ``butterfly.logs``)."""

    level: LogLevel = _setting(_choice("debug", "info", "warning", "error"), "info")
    """Lowest level written."""
    file: Path | None = _setting(_path, None)
    """Also write text lines here (reopened on SIGHUP for logrotate); unset: no file."""
    format: LogFormat = _setting(_choice("auto", "text", "journal"), "auto")
    """``"journal"``: native journal fields; ``"text"``: stderr lines; ``"auto"``: journal under journald."""


@dataclass(frozen=True)
class SecurityConfig:
    """``[security]``: peer authentication."""

    secret_file: Path = _setting(_path, Path("/etc/butterfly/cluster.key"))
    """Cluster secret every connection is authenticated with."""
    tls_cert: Path | None = _setting(_path, None)
    """TLS certificate for peer connections (with ``tls_key``); unset: no TLS."""
    tls_key: Path | None = _setting(_path, None)
    """Private key of ``tls_cert``."""
    tls_ca: Path | None = _setting(_path, None)
    """The cluster's own CA: peers' certificates must chain to it. Required with ``tls_cert``; the
    system store is never trusted (any public CA could then vouch for a peer)."""


@dataclass(frozen=True)
class ValidatorConfig:
    """``[validator]``: re-checking the weights in memory while the node holds them (scrubbing)."""

    scrub: bool = _setting(_boolean, True)
    """Re-hash this node's weights in memory in the background while it is READY or OPERATIONAL."""
    scrub_interval_s: float = _setting(_number(0, inclusive=False), 600.0)
    """A full pass at least this often, as far as ``scrub_cpu_percent`` allows (else a pass takes
    longer, and the log says how long)."""
    scrub_cpu_percent: float = _setting(_number(0, inclusive=False, maximum=100), 2.0)
    """Most of one core scrubbing may use, in percent (above 0, at most 100)."""


@dataclass(frozen=True)
class LoaderConfig:
    """``[loader]``: how weights are streamed from the source."""

    chunk_bytes: int = _setting(_integer(64 << 10, 256 << 20, power_of_two=True), 8 << 20)
    """Bytes per read and per checksum (a power of two, 64 KiB..256 MiB)."""
    concurrency: int = _setting(_integer(1, 64), 4)
    """Chunks in flight at once."""
    retries: int = _setting(_integer(0, 10), 3)
    """Retries of a failed or corrupt chunk before loading fails."""


@dataclass(frozen=True)
class EngineConfig:
    """``[engine]``: the inference engine that serves this node's layers."""

    kv_cache_bytes: int = _setting(_integer(1 << 20), 1 << 30)
    """Memory for the key/value cache of this node's layers (all sequences together, at least 1 MiB).
    A request whose prompt plus max_tokens does not fit waits or is refused with the reason."""
    port: int = _setting(_integer(0, 65535), 0)
    """TCP port (on ``node.bind_address``'s host) of the encrypted stage links and of requests other
    nodes forward to this node's stage; 0: the port after ``node.bind_address``'s."""


@dataclass(frozen=True)
class SupervisorConfig:
    """``[supervisor]``: how the main process looks after its children."""

    stop_timeout_s: float = _setting(_number(0, inclusive=False), 10.0)
    """Seconds a child gets to exit after SIGTERM before SIGKILL."""
    restart_limit: int = _setting(_integer(0), 3)
    """Restarts of one child within ``restart_window_s`` before the node fails; the engine's stage that
    cannot be started (its port taken, say) is retried as often before the node fails."""
    restart_window_s: float = _setting(_number(0, inclusive=False), 60.0)
    """Window over which ``restart_limit`` counts."""
    restart_backoff_s: float = _setting(_number(0, inclusive=True), 0.5)
    """Pause before restarting a child (doubled per restart within the window)."""
    heartbeat_timeout_s: float = _setting(_number(0, inclusive=False), 10.0)
    """A child whose heartbeat on the board is older than this is declared hung."""
    failed_exit_after_s: float = _setting(_number(0, inclusive=True), 30.0)
    """A node that failed for good keeps answering /status (and the journal has why) this long, then
    exits 1 so that systemd restarts it (``Restart=on-failure``)."""


@dataclass(frozen=True)
class Config:
    """The whole node configuration. Build it with ``load_config`` or ``parse_config``."""

    cluster: ClusterConfig = _table(ClusterConfig)
    model: ModelConfig = _table(ModelConfig)
    node: NodeConfig = _table(NodeConfig)
    api: ApiConfig = _table(ApiConfig)
    logging: LoggingConfig = _table(LoggingConfig)
    security: SecurityConfig = _table(SecurityConfig)
    loader: LoaderConfig = _table(LoaderConfig)
    supervisor: SupervisorConfig = _table(SupervisorConfig)
    validator: ValidatorConfig = _table(ValidatorConfig)
    engine: EngineConfig = _table(EngineConfig)
    source: str = field(default="<string>", compare=False, repr=False)
    """Where this config was read from, for error messages; not part of its value."""

    def with_overrides(self, role: str | None = None, seed_nodes: list[str] | None = None) -> Config:
        """Apply ``--role`` / ``--seed-nodes``; each is checked like its key, errors name the flag."""
        ctx = _Context(self.source, Path.cwd())
        config = self
        if role is not None:
            value = _check_of(NodeConfig, "role")(role, "--role", ctx)
            config = dataclasses.replace(config, node=dataclasses.replace(config.node, role=value))
        if seed_nodes is not None:
            nodes = _check_of(ClusterConfig, "seed_nodes")(list(seed_nodes), "--seed-nodes", ctx)
            config = dataclasses.replace(
                config, cluster=dataclasses.replace(config.cluster, seed_nodes=nodes)
            )
        _check_across(config, ctx)
        return config

    def to_toml(self) -> str:
        """The effective configuration, every key written; parsing it gives an equal Config."""
        source = " ".join(self.source.splitlines())  # a comment ends at a newline
        lines = [f"# Effective butterfly configuration (read from {source})", ""]
        for section in fields(self):
            if "table" in section.metadata:
                _emit_table(getattr(self, section.name), section.name, lines)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Parsing.


MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few KiB; reading stops past this, so a wrong ``--config`` cannot fill memory."""


def load_config(path: str | Path) -> Config:
    """Read and validate the file at ``path``; relative paths in it are taken from its directory."""
    file = Path(path)
    expected = "a readable config file"
    try:
        # O_NONBLOCK: opening a FIFO (a mistyped --config) must not wait for a writer for ever.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(str(file), None, expected, exc.strerror or str(exc)) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        found = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise ConfigError(str(file), None, expected, found)
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(str(file), None, expected, exc.strerror or str(exc)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            str(file), None, f"a config file of at most {MAX_CONFIG_BYTES >> 20} MiB", "a larger file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(file), None, "UTF-8 text", f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        ) from None
    return parse_config(text, source=str(file), base_dir=file.absolute().parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Validate TOML ``text``; relative paths are taken from ``base_dir`` (default: the current dir)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line, column = (int(at.group(1)), int(at.group(2))) if at else (None, None)
        raise ConfigError(source, None, "valid TOML", f"a syntax error: {message}", line, column) from None
    ctx = _Context(source, base_dir if base_dir is not None else Path.cwd())
    config: Config = _build(Config, raw, "", ctx)
    config = dataclasses.replace(config, source=source)
    _check_across(config, ctx)
    return config


def _expected_of(check: _Check, key: str, ctx: _Context) -> str:
    """What ``check`` accepts, in its own words: None is no TOML value, so every check rejects it."""
    try:
        check(None, key, ctx)
    except ConfigError as exc:
        return exc.expected
    raise AssertionError(f"the check of {key} accepted None")


def _check_of(cls: type, name: str) -> _Check:
    check: _Check = next(f for f in fields(cls) if f.name == name).metadata["check"]
    return check


def _build(cls: type, raw: Mapping[str, object], prefix: str, ctx: _Context) -> Any:
    """_Check every key of one table against ``cls``'s declarations and construct it."""
    declared = {f.name: f for f in fields(cls) if "check" in f.metadata or "table" in f.metadata}
    noun = "section" if not prefix else "key"
    for name in raw:
        if name not in declared:
            key = f"{prefix}.{name}" if prefix else name
            valid = ", ".join(declared)
            where = "the sections are" if not prefix else f"the keys of [{prefix}] are"
            found = f"unknown {noun} {json.dumps(name)}"
            close = difflib.get_close_matches(name, list(declared), n=1)
            if close:
                found += f" (did you mean {json.dumps(close[0])}?)"
            raise ctx.error(key, f"a known {noun} ({where}: {valid})", found)
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        key = f"{prefix}.{name}" if prefix else name
        if "table" in spec.metadata:
            sub = raw.get(name, {})
            if not isinstance(sub, dict):
                raise ctx.error(key, f"a table [{key}]", _typed(sub))
            values[name] = _build(spec.metadata["table"], sub, key, ctx)
        elif name in raw:
            values[name] = spec.metadata["check"](raw[name], key, ctx)
        elif spec.default is not dataclasses.MISSING:
            values[name] = spec.default
        elif not spec.metadata["derived"]:
            raise ctx.error(
                key, _expected_of(spec.metadata["check"], key, ctx), "nothing (the key is required)"
            )
    finish = _FINISH.get(cls)
    if finish is not None:
        finish(values, prefix, ctx)
    return cls(**values)


def _finish_model(values: dict[str, Any], prefix: str, ctx: _Context) -> None:
    key = f"{prefix}.source_path"
    if values["source_type"] == "s3":
        values["source_path"] = _s3_url(values["source_path"], key, ctx)
    elif values["source_path"].startswith("s3://"):
        raise ctx.error(key, 'a directory (source_type is "filesystem")', _literal(values["source_path"]))
    else:
        values["source_path"] = str(_path(values["source_path"], key, ctx))
    manifest = values["manifest_path"]
    if manifest is not None:
        key = f"{prefix}.manifest_path"
        is_s3 = manifest.startswith("s3://")
        values["manifest_path"] = _s3_url(manifest, key, ctx) if is_s3 else str(_path(manifest, key, ctx))


def _finish_node(values: dict[str, Any], prefix: str, ctx: _Context) -> None:
    if "id" not in values:
        values["id"] = default_node_id(socket.gethostname(), values["bind_address"])


_FINISH: dict[type, Callable[[dict[str, Any], str, _Context], None]] = {
    ModelConfig: _finish_model,
    NodeConfig: _finish_node,
}


def engine_port(config: Config) -> int:
    """The port the engine listens on: ``engine.port``, or the one after ``node.bind_address``'s."""
    return config.engine.port or config.node.bind_address.port + 1


def _check_across(config: Config, ctx: _Context) -> None:
    """Rules between keys; run after parsing and again after overrides."""
    cluster, security = config.cluster, config.security
    if cluster.discovery_method == "dns" and cluster.dns_srv_name is None:
        raise ctx.error(
            "cluster.dns_srv_name",
            'an SRV name like "_butterfly._tcp.example.com" (discovery_method is "dns")',
            "nothing",
        )
    if (security.tls_cert is None) != (security.tls_key is None):
        missing = "tls_key" if security.tls_key is None else "tls_cert"
        other = "tls_cert" if missing == "tls_key" else "tls_key"
        raise ctx.error(f"security.{missing}", f"a path ({other} is set; they go together)", "nothing")
    if security.tls_cert is not None and security.tls_ca is None:
        raise ctx.error(
            "security.tls_ca",
            "a path to the cluster's own CA certificate (tls_cert is set; peers are checked against it, "
            "never against the system store)",
            "nothing",
        )
    if security.tls_ca is not None and security.tls_cert is None:
        # Peer TLS is mutual: a node that checks others' certificates must present its own.
        raise ctx.error("security.tls_cert", "a path (tls_ca is set; TLS is mutual)", "nothing")
    bind, listen = config.node.bind_address, config.api.listen
    port = engine_port(config)
    if port > 65535:
        raise ctx.error("engine.port", f"a port (node.bind_address's port + 1 is {port})", "nothing")
    if port == bind.port or (
        port == listen.port and (listen.host == bind.host or {listen.host, bind.host} & _WILDCARD_HOSTS)
    ):
        raise ctx.error(
            "engine.port",
            f"a port apart from node.bind_address ({bind}) and api.listen ({listen})",
            _literal(str(config.engine.port)),
        )
    if bind.port == listen.port and (
        bind.host == listen.host or bind.host in _WILDCARD_HOSTS or listen.host in _WILDCARD_HOSTS
    ):
        raise ctx.error(
            "api.listen", f"an address apart from node.bind_address ({bind})", _literal(str(listen))
        )


# --------------------------------------------------------------------------------------------------
# Writing TOML back out.


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, HostPort):  # before tuple: a HostPort is a tuple
        return _toml_string(str(value))
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _emit_table(table: DataclassInstance, name: str, lines: list[str]) -> None:
    lines.append(f"[{name}]")
    subtables = []
    for spec in fields(table):
        value = getattr(table, spec.name)
        if "table" in spec.metadata:
            subtables.append((f"{name}.{spec.name}", value))
        elif value is None:
            lines.append(f"# {spec.name} is not set")
        else:
            lines.append(f"{spec.name} = {_toml_value(value)}")
    lines.append("")
    for sub_name, sub in subtables:
        _emit_table(sub, sub_name, lines)
