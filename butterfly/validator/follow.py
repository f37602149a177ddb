"""Validation beside the stream: each tensor hashed from the arena as soon as the loader says it landed.

A load's validation used to start when the loader had finished (stream, warmup, GPU upload), and then
re-read every byte. Now the loader announces the load (``Landing``: the arena and the placements)
and, as the stream goes, the tensors that have landed (``TensorsLanded``: every chunk matched against
the manifest, never written again in this load). ``Follow`` maps the arena read-only and hashes those
tensors, a bounded batch at a time between the validator's other work, so when the load is reported
(``ValidateArena(follow=True)``) only what had not landed yet is left to hash.

The guarantee is the one the validator always gave: every tensor's BLAKE3 is taken from the arena's
bytes after the loader put them there for good, and compared with the manifest's digest; and what the
validation passes is what is in the arena when the load is reported: a tensor hashed as it landed
has every chunk's xxh3 checked again then (``check.changed_chunks``, ~10x BLAKE3's speed), and one that
changed meanwhile is hashed again and named. What a follow hashed is only ever used for the very load
it followed: same epoch, same arena file (inode), same placements, and it is dropped after one
validation (a repair's re-validation hashes everything).

While the loader runs the engine's warmup the hashing pauses (the warmup's threads on every core wait
for each other at every operation; a core taken away stalls them all), and resumes after it.

Must not: write to the arena, or decide anything: the verdict is ``butterfly.validator.process``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os

from butterfly.board.shm import Segment, attach_segment, segment_path
from butterfly.ipc import Landing, Loaded, TensorsLanded
from butterfly.validator.check import arena_end, digest_tensors

__all__ = ["BATCH_BYTES", "Follow", "attach_identified"]

log = logging.getLogger("butterfly.validator")

# Bytes hashed per step: ~50-100 ms on two cores, so commands and heartbeats are never kept waiting.
BATCH_BYTES = 128 << 20


def attach_identified(name: str) -> tuple[Segment, int]:
    """Arena ``name`` mapped read-only, with the inode of the file mapped: the same before and after the
    mapping, or -1 (a file replaced meanwhile: nothing can be matched with it)."""
    path = segment_path(name)
    before = os.stat(path).st_ino
    seg = attach_segment(name, writable=False)
    try:
        after = os.stat(path).st_ino
    except FileNotFoundError:
        after = -1
    return seg, before if before == after else -1


class Follow:
    """The digests of one load's tensors, taken as they land."""

    def __init__(self, cmd: Landing, threads: int) -> None:
        self.epoch = cmd.epoch
        self.arena_name = cmd.arena_name
        self.tensors = cmd.tensors
        self.threads = threads
        self.digests: dict[int, bytes] = {}
        self.pending: list[int] = []
        self.bytes_hashed = 0
        self.seg, self.inode = attach_identified(cmd.arena_name)
        self._views = contextlib.ExitStack()
        try:
            end = arena_end(cmd.tensors)
            if self.seg.size < end:
                size = self.seg.size
                raise ValueError(f"the arena {cmd.arena_name} is {size} bytes; its tensors need {end}")
            self.buf = self._views.enter_context(self.seg.view())
        except BaseException:
            self.close()
            raise

    def landed(self, cmd: TensorsLanded) -> None:
        """Queue these tensors for hashing (another epoch's, or unknown indices, are ignored)."""
        if cmd.epoch != self.epoch:
            return
        queued = set(self.pending)
        for i in cmd.indices:
            if 0 <= i < len(self.tensors) and i not in self.digests and i not in queued:
                self.pending.append(i)
                queued.add(i)

    def step(self, max_bytes: int = BATCH_BYTES) -> int:
        """Hash queued tensors, at least one and about ``max_bytes`` in all; returns the bytes hashed."""
        batch: list[int] = []
        size = 0
        while self.pending and (not batch or size + self.tensors[self.pending[0]].length <= max_bytes):
            i = self.pending.pop(0)
            batch.append(i)
            size += self.tensors[i].length
        if not batch:
            return 0
        digests = digest_tensors(self.buf, [self.tensors[i] for i in batch], self.threads)
        self.digests.update(zip(batch, digests, strict=True))
        self.bytes_hashed += size
        return size

    def serves(self, loaded: Loaded, inode: int) -> bool:
        """Whether these digests are of ``loaded``'s very bytes: the load this followed, in the arena file
        ``inode`` (what the validation maps now; a load that replaced the arena since made a new file)."""
        return (
            loaded.epoch == self.epoch
            and loaded.arena_name == self.arena_name
            and loaded.tensors == self.tensors
            and inode == self.inode >= 0
        )

    def close(self) -> None:
        self._views.close()
        try:
            self.seg.close()
        except BufferError:
            log.error(
                "validator: arena %s still has views after following a load; left mapped", self.seg.name
            )
