"""Scrubbing: re-hashing the weights in memory in the background, at a bounded cost, while they serve.

Owns the order (tensors in arena order, a slice of ``SLICE_BYTES`` at a time, one BLAKE3 per tensor
kept across slices), the pace and what a pass finds:
- pace: two bounds, the later wins. The CPU bound keeps this thread's CPU time (``time.thread_time``
  from the end of one step to the end of the next, so the loop around the steps is charged too) at
  most ``cpu_percent`` of one core: after a step that cost ``c`` seconds the next waits
  ``c * (100 / cpu_percent - 1)``. The interval bound spreads a pass over
  ``interval_s`` (no faster: a pass does not have to run back to back). When the CPU bound is the
  tighter one a pass takes longer than the interval; ``Scrubber.last_pass_s`` says by how much.
- findings: a tensor whose BLAKE3 is not the manifest's is a ``Mismatch`` located by its chunks
  (``butterfly.validator.check.locate``), reported by ``step`` at once; the scrubber stops there.

What is scrubbed is a ``WeightCopy``: today the host arena (``HostArena``). The hook for the GPU copy
(issue 13): a class with the same two methods that hashes device memory (or reads a slice back into
a pinned buffer); give the scrubber one per copy, and the mismatch names the copy.

It must not write to the weights, map or unmap memory (the caller hands it a view it owns), talk to
the supervisor, or decide what a mismatch means for the node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import blake3

from butterfly.ipc import ChunkDigest, Mismatch, TensorPlacement
from butterfly.validator.check import locate

__all__ = ["SLICE_BYTES", "HostArena", "Scrubber", "Step", "WeightCopy"]

# Bytes hashed per step: about a millisecond of one core, so a step never holds the loop (commands,
# heartbeats) for long, and pacing is fine-grained.
SLICE_BYTES = 1 << 20


class WeightCopy(Protocol):
    """One copy of this node's weights, hashed a slice at a time (offsets are arena offsets)."""

    name: str

    def update(self, hasher: blake3.blake3, offset: int, length: int) -> None: ...

    def locate(
        self, tensor: TensorPlacement, chunks: Sequence[ChunkDigest], expected: str, found: str
    ) -> Mismatch: ...


class HostArena:
    """The arena in host memory, through a view the caller keeps alive while scrubbing."""

    name = "host arena"

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def update(self, hasher: blake3.blake3, offset: int, length: int) -> None:
        with self.view[offset : offset + length] as part:
            hasher.update(part)

    def locate(
        self, tensor: TensorPlacement, chunks: Sequence[ChunkDigest], expected: str, found: str
    ) -> Mismatch:
        m = locate(self.view, tensor, chunks, expected, found)
        assert m is not None, "called with a digest that differs"
        return m


@dataclass(frozen=True)
class Step:
    """What one step did: ``hashed`` bytes; ``mismatch`` found (the scrubber then stops); whether it
    ended a pass."""

    hashed: int
    mismatch: Mismatch | None = None
    pass_done: bool = False


class Scrubber:
    """Walks ``tensors`` of ``copy`` pass after pass; call ``step()`` when ``due()`` has come."""

    def __init__(
        self,
        copy: WeightCopy,
        tensors: Sequence[TensorPlacement],
        chunks: Sequence[ChunkDigest],
        *,
        interval_s: float,
        cpu_percent: float,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        if not 0 < cpu_percent <= 100 or interval_s <= 0:
            raise ValueError(
                f"need 0 < cpu_percent <= 100 and interval_s > 0, not {cpu_percent}, {interval_s}"
            )
        missing = [t.name for t in tensors if not t.blake3]
        if missing:
            raise ValueError(f"no manifest digest to scrub against for {', '.join(missing[:3])}")
        self.copy = copy
        self.tensors = [t for t in tensors if t.length > 0]
        self.chunks = chunks
        self.total = sum(t.length for t in self.tensors)
        self.interval_s = interval_s
        self.cpu_share = cpu_percent / 100
        self.clock = clock
        self.cpu_clock = cpu_clock
        # Totals since this scrubber started.
        self.bytes = 0
        self.passes = 0
        self.cpu_s = 0.0
        self.last_pass_s = 0.0
        self.stopped = False
        self._index = 0
        self._offset = 0
        self.tensor_hasher = blake3.blake3(max_threads=1)
        self._pass_start = clock()
        self._pass_bytes = 0
        self._due = self._pass_start
        self._cpu_mark = cpu_clock()

    def due(self) -> float:
        """When the next step may run (``clock`` time); never before the pace allows."""
        return self._due

    def step(self) -> Step:
        """Hash the next slice; at a tensor's end compare it, at the last tensor's end end the pass."""
        if self.stopped or not self.tensors:
            return Step(0)
        t = self.tensors[self._index]
        n = min(SLICE_BYTES, t.length - self._offset)
        self.copy.update(self.tensor_hasher, t.arena_offset + self._offset, n)
        self._offset += n
        mismatch = None
        pass_done = False
        if self._offset == t.length:
            found = self.tensor_hasher.digest()
            if found != t.blake3:
                mismatch = self.copy.locate(t, self.chunks, t.blake3.hex(), found.hex())
                self.stopped = True
            self.tensor_hasher = blake3.blake3(max_threads=1)
            self._offset = 0
            self._index += 1
            if self._index == len(self.tensors):
                self._index = 0
                pass_done = True
        cpu = self.cpu_clock()
        cost, self._cpu_mark = cpu - self._cpu_mark, cpu
        self.bytes += n
        self._pass_bytes += n
        self.cpu_s += cost
        now = self.clock()
        # The later of the two bounds: this step's CPU over the budget, and the pass spread evenly.
        by_cpu = now + cost * (1 / self.cpu_share - 1)
        by_interval = self._pass_start + self.interval_s * self._pass_bytes / self.total
        self._due = max(by_cpu, by_interval)
        if pass_done:
            self.passes += 1
            self.last_pass_s = now - self._pass_start
            self._pass_start = max(now, self._due)
            self._pass_bytes = 0
        return Step(n, mismatch, pass_done)
