"""Start-up checks of what a valid config points at: the things that would otherwise crash a child in a
restart loop (a missing secret, an unwritable directory, a port in use, ...).

``butterfly.config`` checks the file alone and does no I/O; this module looks at the machine: the
cluster secret file, the state and cache directories, the model manifest of a filesystem source, the
two ports. (How many nodes a cluster has is not read from the config: workers given only the
coordinator's address join it.) ``butterfly-node`` runs it for ``--check-config`` and before it starts
the supervisor; each problem is one ``PreflightError`` naming the key, what is wrong and the fix, and
the node exits 78 (EX_CONFIG), so systemd does not restart it into the same failure.

It must not create, change or delete anything: ``--check-config`` is read-only.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

from butterfly.config import Config, HostPort, SecurityConfig
from butterfly.weights.manifest import MANIFEST_FILE

__all__ = ["PreflightError", "check_directory", "preflight"]


class PreflightError(Exception):
    """One problem found before start: ``key`` (dotted), what is wrong, and how to fix it."""

    def __init__(self, source: str, key: str, problem: str, fix: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.problem}; fix: {self.fix}"


class PortInUse(PreflightError):
    """A port the node must listen on is held by another process (which may be this very node)."""


def preflight(
    config: Config,
    *,
    port_held_by_self: Callable[[HostPort], bool] | None = None,
    port_wait_s: float = 0.0,
) -> None:
    """Raise ``PreflightError`` for the first problem found; return when the node can start.

    ``port_held_by_self(address)`` may say that a port in use is held by this very node (a running
    node whose config is being checked again); None: any holder is a problem. A port in use is tried
    again for ``port_wait_s`` seconds first: the children of a node killed just before may still be
    on their way out."""
    _secret(config)
    check_directory(config, "node.state_dir", config.node.state_dir)
    check_directory(config, "node.cache_dir", config.node.cache_dir)
    _manifest(config)
    deadline = time.monotonic() + port_wait_s
    for key, address in (("node.bind_address", config.node.bind_address), ("api.listen", config.api.listen)):
        while True:
            try:
                _port(config, key, address, port_held_by_self)
                break
            except PortInUse:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)


def _secret(config: Config) -> None:
    from butterfly.net.auth import SecretError, load_secret, symlink_problem

    path = config.security.secret_file
    key = "security.secret_file"
    create = f"run `butterfly-admin secret create {path}` once and copy the file to every node"
    default = path == SecurityConfig().secret_file
    if path.is_symlink():
        raise PreflightError(
            config.source,
            key,
            symlink_problem(path),
            f"set secret_file to the file itself (`readlink -f {path}` names it), or replace the link "
            "with a copy of the key file",
        )
    try:
        info = os.stat(path)
    except FileNotFoundError:
        where = " (the default: the config sets no [security] secret_file)" if default else ""
        raise PreflightError(
            config.source, key, f"the cluster secret {path} does not exist{where}", create
        ) from None
    except OSError as exc:
        raise PreflightError(
            config.source,
            key,
            f"the cluster secret {path} cannot be read: {exc.strerror or exc}",
            "run the node as a user that can read it (root:butterfly 0640 is the packaged mode)",
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise PreflightError(
            config.source,
            key,
            f"the cluster secret {path} is a directory",
            f"point secret_file at the key file, or remove the directory and {create}",
        )
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise PreflightError(
            config.source,
            key,
            f"the cluster secret {path} is empty",
            f"remove it and {create} (or copy the cluster's key file over it)",
        )
    if not stat.S_ISREG(info.st_mode):
        raise PreflightError(
            config.source,
            key,
            f"the cluster secret {path} is not a regular file",
            "point secret_file at the cluster's key file",
        )
    if info.st_mode & 0o007:
        raise PreflightError(
            config.source,
            key,
            f"the cluster secret {path} is accessible to every user (mode {stat.S_IMODE(info.st_mode):04o})",
            f"`chmod o-rwx {path}` (root:butterfly 0640 is the packaged mode)",
        )
    try:
        load_secret(path)
    except SecretError as exc:
        # What is left: unreadable by this user, a symlink, too short, too large.
        raise PreflightError(
            config.source, key, str(exc).split(": create it once")[0].split("; create it once")[0], create
        ) from None


def check_directory(config: Config, key: str, path: Path) -> None:
    """``PreflightError`` unless ``path`` is a directory this user can write, or can be created."""
    fix = f"create it writable by the user running the node, or set {key} to such a directory"
    if path.exists():
        if not path.is_dir():
            raise PreflightError(config.source, key, f"{path} is not a directory", fix)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PreflightError(config.source, key, f"{path} is not writable{_why_not(path)}", fix)
        return
    # The node creates it; the nearest existing ancestor must let it.
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PreflightError(
            config.source, key, f"{path} cannot be created: {parent} is not a directory", fix
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(
            config.source,
            key,
            f"{path} does not exist and cannot be created: {parent} is not writable{_why_not(parent)}",
            fix,
        )


def _why_not(path: Path) -> str:
    """Why ``path`` cannot be written: a read-only mount (which no chmod fixes) or this user's rights."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return " (it is on a read-only file system)" if read_only else " by this user"


def _manifest(config: Config) -> None:
    model = config.model
    if model.source_type != "filesystem":
        return
    root = Path(model.source_path)
    if not root.is_dir():
        raise PreflightError(
            config.source,
            "model.source_path",
            f"{root} does not exist or is not a directory",
            "set it to the directory holding config.json and the *.safetensors files",
        )
    if model.manifest_path is not None and not model.manifest_path.startswith("s3://"):
        manifest, key = Path(model.manifest_path), "model.manifest_path"
    elif model.manifest_path is None:
        manifest, key = root / MANIFEST_FILE, "model.source_path"
    else:
        return  # a manifest on S3 is read (and waited for) by the loader
    if not manifest.is_file():
        raise PreflightError(
            config.source,
            key,
            f"no manifest at {manifest}",
            f"run `butterfly-admin manifest build {root}` (it writes {MANIFEST_FILE} beside the weights)"
            if key == "model.source_path"
            else f"build it with `butterfly-admin manifest build MODEL_DIR` and copy it to {manifest}",
        )


def _port(
    config: Config, key: str, address: HostPort, held_by_self: Callable[[HostPort], bool] | None
) -> None:
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PreflightError(
            config.source, key, f"{address}: the host does not resolve ({exc})", "use an address of this host"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as the node's listeners set it: a port in TIME_WAIT is free for them too.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
            return
        except OSError as exc:
            problem = exc
    if problem.errno == errno.EADDRINUSE:
        if held_by_self is not None and held_by_self(address):
            return
        raise PortInUse(
            config.source,
            key,
            f"{address} is in use by another program",
            f"stop the program holding it (`ss -ltnp 'sport = :{address.port}'` names it) or set {key} "
            "to a free port",
        )
    if problem.errno == errno.EADDRNOTAVAIL:
        raise PreflightError(
            config.source, key, f"{address} is not an address of this host", "use an address of this host"
        )
    if problem.errno == errno.EACCES:
        raise PreflightError(
            config.source,
            key,
            f"{address}: binding it needs privileges (a port below 1024)",
            "use a port from 1024 up",
        )
    raise PreflightError(
        config.source, key, f"{address}: {problem.strerror or problem}", "use another address"
    )
