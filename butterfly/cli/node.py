"""`butterfly-node`: parse flags, load and validate the config, run the supervisor.

Exit status: 0 after an orderly stop, 1 when the node failed, 78 (EX_CONFIG) for a bad config or
flag, so systemd's RestartPreventExitStatus=78 stops a restart loop on a typo.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from butterfly import __version__
from butterfly.config import EX_CONFIG, Config, ConfigError, HostPort, load_config
from butterfly.preflight import PortInUse, PreflightError, preflight

PORT_WAIT_S = 10.0
"""How long a start waits for a port in use to be freed (a node killed just before) before exit 78."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="butterfly-node",
        description="Run one Butterfly node: discover peers, elect a coordinator, load this node's "
        "layers, validate them cluster-wide, then serve.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the node's TOML config file")
    p.add_argument("--role", choices=["coordinator", "worker"], help="override [node] role")
    p.add_argument("--seed-nodes", metavar="HOST:PORT,...", help="override [cluster] seed_nodes")
    p.add_argument(
        "--check-config", action="store_true", help="validate the config, print the effective config and exit"
    )
    p.add_argument("--version", action="version", version=f"butterfly-node {__version__}")
    return p


def effective_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    seeds = None
    if args.seed_nodes is not None:
        seeds = [s.strip() for s in args.seed_nodes.split(",") if s.strip()]
        if not seeds and args.seed_nodes.strip():
            # Only commas: a list that went missing (an unset variable between them), not "no seeds",
            # which is an empty --seed-nodes "".
            raise ConfigError(args.config, "--seed-nodes", "host:port,...", repr(args.seed_nodes))
    if args.role is not None or seeds is not None:
        config = config.with_overrides(role=args.role, seed_nodes=seeds)
    return config


def _held_by(config: Config) -> Callable[[HostPort], bool]:
    """Whether a port in use is held by a running node with this config's node id (its API says)."""

    def held(_: HostPort) -> bool:
        from butterfly.cli.admin_client import Unreachable, fetch_status, url_for

        try:
            status = fetch_status(url_for(config.api.listen), timeout=2.0)
        except Unreachable:
            return False
        return status.get("node_id") == config.node.id

    return held


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits 2 on a bad flag; a bad flag is a configuration error to systemd.
        return EX_CONFIG if e.code == 2 else int(e.code or 0)
    try:
        config = effective_config(args)
    except ConfigError as e:
        print(f"butterfly-node: {e}", file=sys.stderr)
        return EX_CONFIG
    try:
        # --check-config may run beside the node it checks: a port that node holds is not a problem.
        if args.check_config:
            preflight(config, port_held_by_self=_held_by(config))
        else:
            try:
                preflight(config, port_wait_s=PORT_WAIT_S)
            except PortInUse:
                # Started twice (by hand beside systemd, say): the port's holder is this very node.
                if not _held_by(config)(config.api.listen):
                    raise
                raise PreflightError(
                    config.source,
                    "node.id",
                    f"node {config.node.id} is already running: its API answers on {config.api.listen}",
                    "stop it first (`systemctl stop butterfly-node`), or give this config its own [node] id "
                    "and ports",
                ) from None
    except PreflightError as e:
        print(f"butterfly-node: {e}", file=sys.stderr)
        return EX_CONFIG
    if args.check_config:
        sys.stdout.write(config.to_toml())
        return 0

    from butterfly.logs import setup_logging
    from butterfly.supervisor.main import Supervisor

    logs = setup_logging(
        config.logging.level,
        config.node.id,
        str(config.logging.file) if config.logging.file else None,
        config.logging.format,
    )
    try:
        import uvloop

        return uvloop.run(Supervisor(config, Path(args.config).resolve().parent, logs).run())
    except Exception:
        logging.getLogger("butterfly.supervisor").exception("supervisor crashed")
        return 1
    finally:
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
