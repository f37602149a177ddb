"""``butterfly-admin force-new-cluster`` and ``raft-info``: offline operations on a node's Raft state.

``raft-info`` prints what a stopped node holds (term, last index, commit, voters, learners), so the
operator can pick the survivor with the longest log. ``force-new-cluster`` recovers a cluster whose
quorum is lost for good (etcd's ``--force-new-cluster``): on one stopped survivor it appends a committed
entry that makes this node the only voter (``butterfly.raft.force_new_cluster_state``); started again,
it elects itself and promotes the other members back as they return. Both refuse while the node runs
(its Raft file is locked).

Exit status: 0 done, 1 refused (node running, no Raft state, damaged storage), 78 bad --config.

This module must not touch a running node or the network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from butterfly.raft import RaftNode, StorageError, force_new_cluster_state
from butterfly.raft.core import RaftConfig
from butterfly.raft.storage import RaftStorage

EX_CONFIG = 78
DEFAULT_CONFIG = "/etc/butterfly/node.toml"


def _storage_path(args: argparse.Namespace) -> tuple[str, Path] | int:
    from butterfly.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"butterfly-admin {args.command}: {e}", file=sys.stderr)
        return EX_CONFIG
    return config.node.id, config.node.state_dir / "raft" / "raft.log"


def _open(command: str, path: Path) -> RaftStorage | int:
    if not path.exists():
        print(f"butterfly-admin {command}: {path}: no Raft state (never joined a cluster)", file=sys.stderr)
        return 1
    try:
        return RaftStorage.open(path)
    except StorageError as e:
        hint = " (stop the node first)" if "locked" in str(e) else ""
        print(f"butterfly-admin {command}: {e}{hint}", file=sys.stderr)
        return 1


def _describe(node_id: str, storage: RaftStorage) -> str:
    node = RaftNode(node_id, RaftConfig(), storage.load(), 0)
    return (
        f"node {node_id}: term {node.term}, last index {node.last_index}, commit {node.commit}, "
        f"cluster {node.cluster_id or '-'}, voters {','.join(node.voters) or '-'}, "
        f"learners {','.join(node.learners) or '-'}"
    )


def cmd_raft_info(args: argparse.Namespace) -> int:
    where = _storage_path(args)
    if isinstance(where, int):
        return where
    node_id, path = where
    storage = _open(args.command, path)
    if isinstance(storage, int):
        return storage
    with storage:
        print(_describe(node_id, storage))
    return 0


def cmd_force_new_cluster(args: argparse.Namespace) -> int:
    where = _storage_path(args)
    if isinstance(where, int):
        return where
    node_id, path = where
    storage = _open(args.command, path)
    if isinstance(storage, int):
        return storage
    with storage:
        persisted = storage.load()
        try:
            forced = force_new_cluster_state(persisted, node_id)
        except ValueError as e:
            print(f"butterfly-admin {args.command}: {e}", file=sys.stderr)
            return 1
        print(f"before: {_describe(node_id, storage)}")
        assert persisted is not None
        new = forced.entries[len(persisted.entries) :]
        storage.save(forced.hard_state, new)
        print(f"after:  {_describe(node_id, storage)}")
    print(
        f"{node_id} is now the only voter. Start it; it promotes other members back to voters as they "
        "join (up to quorum_size). Do not start a member that was not stopped before this command."
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = sub.add_parser(
        "force-new-cluster",
        help="make this stopped node the only voter of its cluster (the quorum is lost for good)",
        description="Recover a cluster that lost a majority of its voters for good: run on one stopped "
        "survivor (the one with the longest log: see raft-info). It keeps its log, commits all of it, "
        "and becomes the only voter. Exit status: 0 done, 1 refused, 78 bad --config.",
    )
    f.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"default {DEFAULT_CONFIG}")
    f.set_defaults(func=cmd_force_new_cluster)
    i = sub.add_parser(
        "raft-info",
        help="show a stopped node's Raft state (term, last index, commit, voters)",
        description="Print a stopped node's Raft state. Exit status: 0 ok, 1 refused, 78 bad --config.",
    )
    i.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE", help=f"default {DEFAULT_CONFIG}")
    i.set_defaults(func=cmd_raft_info)
