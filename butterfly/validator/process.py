"""The validator child: independently re-hashes what the loader put in the arena.

It reads the arena (never the model files), so it checks the bytes the node will actually serve:
- every chunk's xxh3 must equal the digest the loader computed as the chunk landed (catches any
  byte changed in the arena after it was read);
- every layer unit gets a BLAKE3 digest over its tensors in name order; those digests are this
  node's Merkle leaves, and their root is what the cluster compares against the manifest root.
Hashing releases the GIL in blake3 and xxhash, and the leaves are hashed on several threads.

This module must not write to the arena or talk to peers.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import xxhash

from butterfly.board import ValidatorSection
from butterfly.board.shm import attach_segment
from butterfly.hashing import Span, blake3_regions
from butterfly.ipc import Failed, Shutdown, SyncChannel, ValidateArena, Validated
from butterfly.manifest import unit_digest
from butterfly.merkle import leaf_hash, merkle_root
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    CommandInbox,
    bootstrap,
    child_socket,
    hold_if_requested,
    run_beside,
)

log = logging.getLogger("butterfly.validator")


class ValidationError(Exception):
    pass


def unit_digests(buf: memoryview, cmd: ValidateArena, threads: int) -> tuple[list[int], list[bytes]]:
    """Digest of each layer unit (butterfly.manifest.unit_digest, the manifest's own definition): every
    tensor's BLAKE3 on all cores at once (blake3_regions balances big and small tensors), then the
    per-unit combination, which is cheap."""
    tensors = cmd.loaded.tensors
    digests = blake3_regions(buf, [[Span(t.arena_offset, t.length)] for t in tensors], threads=threads)
    by_unit: dict[int, list[tuple[str, int, bytes]]] = defaultdict(list)
    for t, d in zip(tensors, digests, strict=True):
        by_unit[t.unit].append((t.name, t.length, d))
    units = sorted(by_unit)
    return units, [unit_digest(by_unit[u]) for u in units]


def check_chunks(buf: memoryview, cmd: ValidateArena) -> None:
    for c in cmd.loaded.chunks:
        got = xxhash.xxh3_64_intdigest(buf[c.arena_offset : c.arena_offset + c.length])
        if got != c.xxh3:
            owner = next(
                (
                    t
                    for t in cmd.loaded.tensors
                    if t.arena_offset <= c.arena_offset < t.arena_offset + t.length
                ),
                None,
            )
            where = (
                f"tensor {owner.name} at byte {c.arena_offset - owner.arena_offset}" if owner else "padding"
            )
            raise ValidationError(
                f"arena bytes changed after loading: chunk at arena offset {c.arena_offset} ({where}) "
                f"has xxh3 {got:016x}, the loader read {c.xxh3:016x}"
            )


def validate(ctx: ChildContext, cmd: ValidateArena) -> Validated:
    loaded = cmd.loaded

    def beat() -> None:
        ctx.board.update(ValidatorSection, heartbeat_mono_ns=time.monotonic_ns())

    hold_if_requested("validation", beat)
    total = sum(t.length for t in loaded.tensors)
    ctx.board.update(
        ValidatorSection, bytes_hashed=0, bytes_total=total, heartbeat_mono_ns=time.monotonic_ns()
    )
    seg = attach_segment(loaded.arena_name, writable=False)
    try:
        views = [memoryview(seg.buf)]

        def hash_arena() -> tuple[list[int], list[bytes]]:
            check_chunks(views[0], cmd)
            return unit_digests(views[0], cmd, threads=os.cpu_count() or 1)

        try:
            # Hashing gigabytes takes many heartbeat periods: beat beside it.
            units, digests = run_beside(hash_arena, beat)
        finally:
            views.clear()
    finally:
        seg.close()
    root = merkle_root([leaf_hash(d) for d in digests])
    ctx.board.update(
        ValidatorSection,
        bytes_hashed=total,
        leaves_root=root.hex(),
        heartbeat_mono_ns=time.monotonic_ns(),
    )
    return Validated(
        epoch=cmd.epoch,
        units=units,
        unit_digests=digests,
        root=root,
        bytes_hashed=total,
    )


def serve(ctx: ChildContext, chan: SyncChannel, inbox: CommandInbox) -> None:
    while True:
        cmd = inbox.get(timeout=HEARTBEAT_S)
        ctx.board.update(ValidatorSection, heartbeat_mono_ns=time.monotonic_ns())
        if cmd is None:
            continue
        if isinstance(cmd, Shutdown):
            return
        if isinstance(cmd, ValidateArena):
            try:
                chan.send(validate(ctx, cmd))
            except (ValidationError, OSError, ValueError) as e:
                log.error("validation of epoch %d failed: %s", cmd.epoch, e)
                ctx.board.update(ValidatorSection, mismatches=ctx.board.read(ValidatorSection).mismatches + 1)
                chan.send(Failed("validate", str(e)))
        else:
            log.warning("validator ignores %s", type(cmd).__name__)


def main() -> None:
    ctx, chan = bootstrap("validator", child_socket())
    # No heartbeat yet: the supervisor gives a child until its serve loop's first beat to start.
    ctx.board.update(ValidatorSection, pid=os.getpid())
    inbox = CommandInbox(chan)
    try:
        serve(ctx, chan, inbox)
    finally:
        ctx.board.close()
        ctx.logs.close()


if __name__ == "__main__":
    main()
