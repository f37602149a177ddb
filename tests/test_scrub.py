"""The scrubber alone, over a buffer with clocks a test drives: the pace keeps to both bounds, a pass
covers every byte, and a changed byte is found and located."""

from __future__ import annotations

import os

import blake3
import pytest
import xxhash

from butterfly.ipc import ChunkDigest, TensorPlacement
from butterfly.validator.scrub import SLICE_BYTES, HostArena, Scrubber

CHUNK = 64 << 10


class Clocks:
    """A wall clock the test advances, and a CPU clock charging a fixed cost per step (which the
    wall clock sees pass too: hashing is CPU-bound)."""

    def __init__(self, cost: float) -> None:
        self.now = 100.0
        self.cpu = 0.0
        self.cost = cost
        self._started = False

    def wall(self) -> float:
        return self.now

    def thread(self) -> float:
        # Read once when the scrubber starts, then once at the end of each step: each step costs `cost`.
        if self._started:
            self.cpu += self.cost
            self.now += self.cost
        self._started = True
        return self.cpu


def arena(sizes: list[int]) -> tuple[bytearray, list[TensorPlacement], list[ChunkDigest]]:
    buf = bytearray(sum(sizes))
    buf[:] = os.urandom(len(buf))
    tensors, chunks, off = [], [], 0
    for i, n in enumerate(sizes):
        tensors.append(
            TensorPlacement(
                f"model.layers.{i}.mlp.up_proj.weight",
                i + 1,
                off,
                n,
                blake3.blake3(buf[off : off + n]).digest(),
            )
        )
        for c in range(0, n, CHUNK):
            m = min(CHUNK, n - c)
            chunks.append(ChunkDigest(off + c, m, xxhash.xxh3_64_intdigest(buf[off + c : off + c + m])))
        off += n
    return buf, tensors, chunks


def run_pass(s: Scrubber, clocks: Clocks) -> list[float]:
    """Step until a pass ends, each step at the time it is due; the due times seen."""
    seen = []
    while True:
        clocks.now = max(clocks.now, s.due())
        seen.append(clocks.now)
        if s.step().pass_done:
            return seen


def test_a_pass_covers_every_byte_and_is_spread_over_the_interval() -> None:
    buf, tensors, chunks = arena([3 * SLICE_BYTES + 5, 100, SLICE_BYTES])
    clocks = Clocks(cost=0.0001)
    s = Scrubber(
        HostArena(memoryview(buf)),
        tensors,
        chunks,
        interval_s=60.0,
        cpu_percent=2.0,
        clock=clocks.wall,
        cpu_clock=clocks.thread,
    )
    start = clocks.now
    run_pass(s, clocks)
    assert (s.passes, s.bytes) == (1, len(buf))
    # The interval is the tighter bound here: the pass ends when it is due, not earlier.
    assert s.due() == pytest.approx(start + 60.0)
    assert s.last_pass_s == pytest.approx(60.0 * (len(buf) - SLICE_BYTES) / len(buf), rel=0.01)
    run_pass(s, clocks)
    assert s.passes == 2 and s.bytes == 2 * len(buf)
    assert s.cpu_s == pytest.approx(0.0001 * 12)  # 6 steps a pass


def test_the_cpu_budget_wins_when_the_interval_is_too_short_for_it() -> None:
    buf, tensors, chunks = arena([4 * SLICE_BYTES])
    clocks = Clocks(cost=0.01)  # 10 ms of CPU per slice
    s = Scrubber(
        HostArena(memoryview(buf)),
        tensors,
        chunks,
        interval_s=0.001,
        cpu_percent=5.0,
        clock=clocks.wall,
        cpu_clock=clocks.thread,
    )
    times = run_pass(s, clocks)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 5% of a core: 10 ms of work, then 190 ms off.
    assert gaps == pytest.approx([0.2] * 3)
    assert s.cpu_s / (s.due() - times[0]) == pytest.approx(0.05)


def test_a_changed_byte_is_found_with_tensor_layer_offset_and_digests() -> None:
    buf, tensors, chunks = arena([SLICE_BYTES + 3 * CHUNK, 2 * CHUNK])
    clocks = Clocks(cost=0.0)
    s = Scrubber(
        HostArena(memoryview(buf)),
        tensors,
        chunks,
        interval_s=1.0,
        cpu_percent=100.0,
        clock=clocks.wall,
        cpu_clock=clocks.thread,
    )
    run_pass(s, clocks)
    victim = tensors[1]
    buf[victim.arena_offset + CHUNK + 7] ^= 1
    found = None
    for _ in range(10):
        clocks.now = max(clocks.now, s.due())
        found = s.step().mismatch
        if found is not None:
            break
    assert found is not None and s.stopped
    assert (found.tensor, found.layer, found.offset, found.length) == (victim.name, "layer 1", CHUNK, CHUNK)
    assert found.expected == victim.blake3.hex() and found.found != found.expected
    assert found.chunk_expected == f"{chunks[-1].xxh3:016x}"
    assert s.step().hashed == 0  # stopped: the caller decides what comes next


def test_a_tensor_without_a_manifest_digest_cannot_be_scrubbed() -> None:
    buf, tensors, chunks = arena([100])
    bare = [TensorPlacement(t.name, t.unit, t.arena_offset, t.length) for t in tensors]
    with pytest.raises(ValueError, match="no manifest digest"):
        Scrubber(HostArena(memoryview(buf)), bare, chunks, interval_s=1.0, cpu_percent=1.0)
    with pytest.raises(ValueError, match="cpu_percent"):
        Scrubber(HostArena(memoryview(buf)), tensors, chunks, interval_s=1.0, cpu_percent=0.0)
