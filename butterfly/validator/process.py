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

Between commands, while the node holds validated weights (``StartScrub`` .. ``StopScrub``), it
scrubs them (``butterfly.validator.scrub``): at the configured pace, a slice at a time, keeping the
arena mapped. A mismatch sets the board's ``fault`` at once (a node with it set must not serve),
then goes to the supervisor as ``ScrubMismatch``; ``fault`` clears when a validation passes again.

This module must not write to the arena or talk to peers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from butterfly.board import LoaderSection, ValidatorSection
from butterfly.board.shm import Segment, attach_segment
from butterfly.ipc import (
    Failed,
    Landing,
    ScrubMismatch,
    Shutdown,
    StartScrub,
    StopScrub,
    SyncChannel,
    TensorsLanded,
    ValidateArena,
    Validated,
)
from butterfly.states import LoadStep
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    CommandInbox,
    bootstrap,
    child_socket,
    hold_if_requested,
    run_beside,
)
from butterfly.validator.check import (
    ArenaDigests,
    Mismatch,
    arena_end,
    changed_chunks,
    describe,
    digest_arena,
    mismatches,
)
from butterfly.validator.follow import Follow, attach_identified
from butterfly.validator.scrub import HostArena, Scrubber
from butterfly.weights.merkle import leaf_hash, merkle_root

log = logging.getLogger("butterfly.validator")

# How often a follow paused by the loader's warmup looks whether it may go on.
WARMUP_POLL_S = 0.05


def _close(seg: Segment) -> None:
    try:
        seg.close()
    except BufferError:
        # A view outlived its check (a bug): keep the mapping rather than lose the verdict over it.
        log.error("validator: arena %s still has views after the check; left mapped", seg.name)


def validate(ctx: ChildContext, cmd: ValidateArena, follow: Follow | None = None) -> Validated | Failed:
    """The verdict on ``cmd.loaded``'s bytes: their digests, or a ``Failed`` naming what differs. With
    ``follow`` the digests it took of this very load's tensors as they landed count; the rest are
    hashed now."""
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
        seg, inode = attach_identified(loaded.arena_name)
    except FileNotFoundError:
        return Failed("validate", f"the arena {loaded.arena_name} of {blocks} is gone (its loader exited)")
    known = dict(follow.digests) if follow is not None and follow.serves(loaded, inode) else {}
    if known:
        early = sum(loaded.tensors[i].length for i in known)
        ctx.board.update(ValidatorSection, bytes_hashed=early)
        log.info(
            "validating epoch %d: %d of %d bytes were hashed as they landed, the rest now",
            cmd.epoch,
            early,
            total,
        )
    try:
        end = arena_end(loaded.tensors)
        if seg.size < end:
            return Failed(
                "validate",
                f"the arena {loaded.arena_name} is {seg.size} bytes; the tensors of {blocks} need {end}",
            )
        with seg.view() as buf:

            def hash_arena() -> tuple[ArenaDigests, list[Mismatch]]:
                threads = os.cpu_count() or 1
                # What changed since it was hashed (a stray write, a flipped bit) is hashed again,
                # so its mismatch is found and named as if nothing had been hashed before.
                if known:
                    followed = list(known)
                    changed = changed_chunks(
                        buf, [loaded.tensors[i] for i in followed], loaded.chunks, threads
                    )
                    for k in changed:
                        del known[followed[k]]
                d = digest_arena(buf, loaded.tensors, threads=threads, known=known)
                return d, mismatches(buf, loaded.tensors, loaded.chunks, d.tensor_digests)

            # Hashing gigabytes takes many heartbeat periods: beat beside it.
            digests, bad = run_beside(hash_arena, beat)
    finally:
        _close(seg)
    if bad:
        mine = ctx.board.read(ValidatorSection).mismatches
        ctx.board.update(
            ValidatorSection, fault=1, mismatches=mine + len(bad), heartbeat_mono_ns=time.monotonic_ns()
        )
        return Failed("validate", describe(bad, f"the weights in memory for {blocks} are not the model's"))
    root = merkle_root([leaf_hash(d) for d in digests.unit_digests])
    ctx.board.update(
        ValidatorSection,
        fault=0,
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


def answer(ctx: ChildContext, cmd: ValidateArena, follow: Follow | None = None) -> Validated | Failed:
    """``validate``, with an error of the validator itself turned into a report that says so."""
    try:
        result = validate(ctx, cmd, follow if cmd.follow else None)
    except Exception as e:  # a bug or a broken environment, never a verdict on the weights
        log.exception("validation of epoch %d could not run", cmd.epoch)
        result = Failed("validate", f"the validator could not check the weights: {type(e).__name__}: {e}")
    if isinstance(result, Failed):
        log.error("validation of epoch %d failed: %s", cmd.epoch, result.reason)
    return result


class Scrub:
    """A scrub of one validated assignment: the arena mapped read-only for as long as it runs."""

    def __init__(self, ctx: ChildContext, cmd: StartScrub) -> None:
        cfg = ctx.config.validator
        self.ctx = ctx
        self.epoch = cmd.epoch
        self.blocks = f"blocks {cmd.loaded.start}-{cmd.loaded.stop - 1}"
        self.seg = attach_segment(cmd.loaded.arena_name, writable=False)
        self._views = contextlib.ExitStack()
        try:
            copy = HostArena(self._views.enter_context(self.seg.view()))
            self.scrubber = Scrubber(
                copy,
                cmd.loaded.tensors,
                cmd.loaded.chunks,
                interval_s=cfg.scrub_interval_s,
                cpu_percent=cfg.scrub_cpu_percent,
            )
        except BaseException:
            self.close()
            raise
        # Counters on the board are the node's totals: a new scrub continues them.
        self.base = ctx.board.read(ValidatorSection)
        ctx.board.update(ValidatorSection, scrubbing=1)
        log.info(
            "scrubbing %s (%d bytes): a pass every %.0fs at most %.1f%% of one core",
            self.blocks,
            self.scrubber.total,
            cfg.scrub_interval_s,
            cfg.scrub_cpu_percent,
        )

    def step(self) -> ScrubMismatch | None:
        s = self.scrubber
        result = s.step()
        b = self.base
        self.ctx.board.update(
            ValidatorSection,
            scrub_bytes=b.scrub_bytes + s.bytes,
            scrub_passes=b.scrub_passes + s.passes,
            scrub_cpu_s=b.scrub_cpu_s + s.cpu_s,
            scrub_last_pass_s=s.last_pass_s or b.scrub_last_pass_s,
            heartbeat_mono_ns=time.monotonic_ns(),
        )
        if result.pass_done:
            slow = s.last_pass_s > s.interval_s * 1.1
            log.log(
                logging.WARNING if slow else logging.DEBUG,
                "scrub pass %d over %s took %.1fs%s",
                b.scrub_passes + s.passes,
                self.blocks,
                s.last_pass_s,
                f", longer than scrub_interval_s ({s.interval_s:.0f}s) at the CPU budget" if slow else "",
            )
        if result.mismatch is None:
            return None
        m = result.mismatch
        # The flag first: whatever reads the board stops serving without waiting for the supervisor.
        self.ctx.board.update(
            ValidatorSection, fault=1, mismatches=self.ctx.board.read(ValidatorSection).mismatches + 1
        )
        reason = describe([m], f"scrubbing found the weights in memory for {self.blocks} changed")
        log.error(
            "%s",
            reason,
            extra={
                "fields": {
                    "TENSOR": m.tensor,
                    "LAYER": m.layer,
                    "OFFSET": m.offset if m.offset is not None else "",
                    "EXPECTED": m.expected,
                    "FOUND": m.found,
                }
            },
        )
        return ScrubMismatch(self.epoch, [m], reason)

    def close(self) -> None:
        self._views.close()
        _close(self.seg)
        self.ctx.board.update(ValidatorSection, scrubbing=0)


def serve(ctx: ChildContext, chan: SyncChannel, inbox: CommandInbox) -> None:
    scrub: Scrub | None = None
    follow: Follow | None = None

    def stop() -> None:
        nonlocal scrub
        if scrub is not None:
            scrub.close()
            scrub = None

    def unfollow() -> None:
        nonlocal follow
        if follow is not None:
            follow.close()
            follow = None

    try:
        while True:
            wait = HEARTBEAT_S
            if scrub is not None:
                wait = min(wait, max(0.0, scrub.scrubber.due() - time.monotonic()))
            hashing = follow is not None and bool(follow.pending) and not _loader_warming_up(ctx)
            if hashing:
                wait = 0.0
            elif follow is not None and follow.pending:
                wait = min(wait, WARMUP_POLL_S)
            cmd = inbox.get(timeout=wait)
            ctx.board.update(ValidatorSection, heartbeat_mono_ns=time.monotonic_ns())
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, Landing):
                stop()
                unfollow()
                follow = start_follow(ctx, cmd)
            elif isinstance(cmd, TensorsLanded):
                if follow is not None:
                    follow.landed(cmd)
            elif isinstance(cmd, ValidateArena):
                stop()
                chan.send(answer(ctx, cmd, follow))
                unfollow()  # one validation per followed load: a later one re-hashes everything
            elif isinstance(cmd, StartScrub):
                stop()
                if ctx.config.validator.scrub:
                    scrub = start_scrub(ctx, cmd)
            elif isinstance(cmd, StopScrub):
                stop()
                unfollow()  # a load is about to replace the arena: let go of the old one
            elif cmd is not None:
                log.warning("validator ignores %s", type(cmd).__name__)
            if follow is not None and follow.pending and not _loader_warming_up(ctx):
                follow.step()
                ctx.board.update(
                    ValidatorSection, bytes_hashed=follow.bytes_hashed, heartbeat_mono_ns=time.monotonic_ns()
                )
            if scrub is not None and time.monotonic() >= scrub.scrubber.due():
                found = scrub.step()
                if found is not None:
                    stop()
                    chan.send(found)
    finally:
        stop()
        unfollow()


def _loader_warming_up(ctx: ChildContext) -> bool:
    """The loader runs the engine's warmup: a forward pass on every core, whose threads wait for each
    other at every operation, so a core taken by hashing stalls all of them (measured on 2 cores: warmup
    0.55 s alone, 1.5 s beside the hashing). Hashing beside the stream pauses meanwhile."""
    return ctx.board.read(LoaderSection).step == int(LoadStep.WARMUP)


def start_follow(ctx: ChildContext, cmd: Landing) -> Follow | None:
    """Hashing ``cmd``'s tensors as they land, or None (logged) when its arena cannot be mapped: the
    load's validation then hashes everything after it, as it always could."""
    try:
        follow = Follow(cmd, threads=max(1, (os.cpu_count() or 1) - 1))
    except (OSError, ValueError) as e:
        log.warning("cannot follow the load of epoch %d (%s): validating it after the load", cmd.epoch, e)
        return None
    total = sum(t.length for t in cmd.tensors)
    ctx.board.update(ValidatorSection, bytes_hashed=0, bytes_total=total)
    return follow


def start_scrub(ctx: ChildContext, cmd: StartScrub) -> Scrub | None:
    """A running scrub of ``cmd``'s arena, or None (logged) when it cannot start: the node keeps
    serving what it validated, it is only not re-checked."""
    try:
        return Scrub(ctx, cmd)
    except (OSError, ValueError) as e:
        log.error("cannot scrub epoch %d: %s", cmd.epoch, e)
        return None


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
