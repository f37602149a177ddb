"""`butterfly-admin diagnose`: the checks an operator would run by hand before (or after) starting a node.

From a config file it checks config, ports, peers, DNS SRV, the model source, manifest, cluster secret,
disk and GPUs. Each prints PASS, FAIL or SKIP with a line saying what was found and, for a FAIL, what
to do. Exit status: 0 no FAIL, 1 a check failed, 78 the config is invalid (see ``admin_client``).

This module owns the checks. It must not change anything on the node or on disk: it binds a port for
an instant to see whether it is free, opens TCP connections to peers and reads files, nothing more (no
cache quarantine, no secret generation).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from butterfly.cli.admin_client import (
    DEFAULT_CONFIG,
    EX_CONFIG,
    EXIT_OK,
    EXIT_PROBLEM,
    Unreachable,
    fetch_status,
    human_bytes,
    make_console,
    url_for,
)

if TYPE_CHECKING:
    from rich.console import Console

    from butterfly.config import Config
    from butterfly.discovery import PeerAddress
    from butterfly.weights.manifest import Manifest

PEER_CONNECT_TIMEOUT_S = 2.0
# With no manifest to say how big the model is, less free space than this in the cache dir is a FAIL.
LOW_DISK_BYTES = 1 << 30
_WILDCARDS = frozenset({"0.0.0.0", "::"})


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
            self.directories(),
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

    def directories(self) -> Check:
        """What the node's start refuses (exit 78): a state or cache dir it cannot create or write."""
        from butterfly.preflight import PreflightError, check_directory

        name = "directories"
        node = self.config.node
        try:
            for key, path in (("node.state_dir", node.state_dir), ("node.cache_dir", node.cache_dir)):
                check_directory(self.config, key, path)
        except PreflightError as e:
            return _failed(name, f"{e.key}: {e.problem}", e.fix)
        return _passed(
            name, f"state_dir {node.state_dir} and cache_dir {node.cache_dir}: writable or creatable"
        )

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
        # The cache dir may not exist yet (the package's tmpfiles.d file or the node makes it):
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "diagnose",
        help="check a node's config, ports, peers, model source, secret, disk and GPUs",
        description="Run the node's start-up checks from its config; each prints PASS, FAIL or SKIP. "
        "Exit status: 0 no FAIL, 1 a check failed, 78 the config is invalid.",
    )
    d.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"default {DEFAULT_CONFIG}")
    d.add_argument("--json", action="store_true", help="the checks as JSON")
    d.set_defaults(func=cmd_diagnose)
