"""The arena begun before the loader exists: what a node's start overlaps with its slowest imports.

At a node's start the loader is the last child up that matters (its fork waits for the fork server to
import the engine, torch, which takes a second or more), while faulting in a multi-gigabyte arena is
the longest step before the stream (every page allocated and zeroed by the kernel). The supervisor
therefore starts the arena itself, on a helper thread, as soon as it runs: same name, same likely
size as the loader would pick, its pages allocated in the file but never mapped here (``reserve``:
mapping them would cost a page-table pass to make and another to undo). The first loader adopts the
file (``EarlyArena(adopt=True)``): it maps the pages and faults them in, allocating those the
supervisor has not reserved yet. Nothing depends on the supervisor finishing, or starting at all:
the loader makes the arena itself where there is none.

Must not: write a byte of the arena, or outlive the node's start (a restarted loader never adopts:
what it finds under the name may be what an engine still serves from).
"""

from __future__ import annotations

import os

from butterfly.config import Config
from butterfly.loader.arena import ARENA_ALIGN, EarlyArena
from butterfly.weights.manifest import Manifest
from butterfly.weights.modelsource import load_manifest

__all__ = ["likely_arena_bytes", "prewarm"]


def likely_arena_bytes(config: Config, manifest: Manifest) -> int:
    """What this node will most likely load, from the manifest and its share of the cluster: the
    whole model for a one-voter cluster, else an even share of quorum_size nodes; never more than
    the machine's memory less the reserve."""
    model = sum(t.length + ARENA_ALIGN for t in manifest.tensors)
    share = -(-model // max(1, config.cluster.quorum_size))
    cap = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") - config.node.memory_reserve_bytes
    return min(share, cap)


def prewarm(config: Config, arena_name: str) -> EarlyArena:
    """Start making the node's arena on a helper thread (the manifest is read there too), handed over
    to the loader when done. Any failure (no manifest yet, no memory) only means the loader makes it."""
    return EarlyArena(arena_name, lambda: likely_arena_bytes(config, load_manifest(config)), hand_over=True)
