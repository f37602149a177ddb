"""The validator child: independently re-hashes what the loader put in the arena.

It reads the arena (never the model files), so it checks the bytes the node will actually serve
(``butterfly.validator.check`` holds the checks themselves):
- every tensor's BLAKE3 must equal the manifest's digest; a tensor that differs is named with its
  layer, the first differing chunk's offset, and the expected and found digests;
- every layer unit gets a digest over its tensors (the manifest's definition); those digests are this
  node's Merkle leaves, and their root is what the cluster compares against the manifest root.
Hashing releases the GIL in blake3 and xxhash, and the tensors are hashed on several threads.

Every command gets an answer: a mismatch is a ``Failed`` whose reason names the fault, and an error
of the validator itself is reported as one (never a crash that the supervisor would restart into the
same error until the node fails for the wrong reason). The arena is mapped for one check at a time,
through a view released when the check ends (``Segment.view``).

This module must not write to the arena or talk to peers.
"""

from __future__ import annotations

import logging
import os
import time

from butterfly.board import ValidatorSection
from butterfly.board.shm import Segment, attach_segment
from butterfly.ipc import Failed, Shutdown, SyncChannel, ValidateArena, Validated
from butterfly.merkle import leaf_hash, merkle_root
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    CommandInbox,
    bootstrap,
    child_socket,
    hold_if_requested,
)
from butterfly.validator.check import describe, digest_arena, mismatches

log = logging.getLogger("butterfly.validator")


def _close(seg: Segment) -> None:
    try:
        seg.close()
    except BufferError:
        # A view outlived its check (a bug): keep the mapping rather than lose the verdict over it.
        log.error("validator: arena %s still has views after the check; left mapped", seg.name)


def validate(ctx: ChildContext, cmd: ValidateArena) -> Validated | Failed:
    """The verdict on ``cmd.loaded``'s bytes: their digests, or a ``Failed`` naming what differs."""
    loaded = cmd.loaded
    blocks = f"blocks {loaded.start}-{loaded.stop - 1}"

    def beat() -> None:
        ctx.board.update(ValidatorSection, heartbeat_mono_ns=time.monotonic_ns())

    hold_if_requested("validation", beat)
    total = sum(t.length for t in loaded.tensors)
    ctx.board.update(
        ValidatorSection, bytes_hashed=0, bytes_total=total, heartbeat_mono_ns=time.monotonic_ns()
    )
    try:
        seg = attach_segment(loaded.arena_name, writable=False)
    except FileNotFoundError:
        return Failed("validate", f"the arena {loaded.arena_name} of {blocks} is gone (its loader exited)")
    try:
        end = max((t.arena_offset + t.length for t in loaded.tensors), default=0)
        if seg.size < end:
            return Failed(
                "validate",
                f"the arena {loaded.arena_name} is {seg.size} bytes; the tensors of {blocks} need {end}",
            )
        with seg.view() as buf:
            digests = digest_arena(buf, loaded.tensors, threads=os.cpu_count() or 1)
            bad = mismatches(buf, loaded.tensors, loaded.chunks, digests.tensor_digests)
    finally:
        _close(seg)
    if bad:
        mine = ctx.board.read(ValidatorSection).mismatches
        ctx.board.update(ValidatorSection, mismatches=mine + len(bad), heartbeat_mono_ns=time.monotonic_ns())
        return Failed("validate", describe(bad, f"the weights in memory for {blocks} are not the model's"))
    root = merkle_root([leaf_hash(d) for d in digests.unit_digests])
    ctx.board.update(
        ValidatorSection,
        bytes_hashed=total,
        leaves_root=root.hex(),
        heartbeat_mono_ns=time.monotonic_ns(),
    )
    return Validated(
        epoch=cmd.epoch,
        units=digests.units,
        unit_digests=digests.unit_digests,
        root=root,
        bytes_hashed=total,
    )


def answer(ctx: ChildContext, cmd: ValidateArena) -> Validated | Failed:
    """``validate``, with an error of the validator itself turned into a report that says so."""
    try:
        result = validate(ctx, cmd)
    except Exception as e:  # a bug or a broken environment, never a verdict on the weights
        log.exception("validation of epoch %d could not run", cmd.epoch)
        result = Failed("validate", f"the validator could not check the weights: {type(e).__name__}: {e}")
    if isinstance(result, Failed):
        log.error("validation of epoch %d failed: %s", cmd.epoch, result.reason)
    return result


def serve(ctx: ChildContext, chan: SyncChannel, inbox: CommandInbox) -> None:
    while True:
        cmd = inbox.get(timeout=HEARTBEAT_S)
        ctx.board.update(ValidatorSection, heartbeat_mono_ns=time.monotonic_ns())
        if cmd is None:
            continue
        if isinstance(cmd, Shutdown):
            return
        if isinstance(cmd, ValidateArena):
            chan.send(answer(ctx, cmd))
        else:
            log.warning("validator ignores %s", type(cmd).__name__)


def main() -> None:
    ctx, chan = bootstrap("validator", child_socket())
    ctx.board.update(ValidatorSection, pid=os.getpid(), heartbeat_mono_ns=time.monotonic_ns())
    inbox = CommandInbox(chan)
    try:
        serve(ctx, chan, inbox)
    finally:
        ctx.board.close()
        ctx.logs.close()


if __name__ == "__main__":
    main()
