"""The loader's arena (butterfly.loader.arena) and the heartbeat helper for long steps (run_beside)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from butterfly.board.shm import open_segment_count, unlink_segment
from butterfly.loader import arena
from butterfly.loader.arena import ArenaError, EarlyArena, allocate
from butterfly.supervisor.childproc import run_beside


def _name() -> str:
    return f"butterfly-test-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}-arena"


def _resident_pages(buf: memoryview) -> int:
    """Pages of ``buf`` mapped in this process, from /proc/self/smaps' Rss of its mapping."""
    import ctypes

    anchor = ctypes.c_char.from_buffer(buf)
    try:
        start = ctypes.addressof(anchor)
    finally:
        del anchor
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for k, line in enumerate(lines):
        lo = line.split(" ", 1)[0].split("-")
        if len(lo) == 2 and all(c in "0123456789abcdef" for c in lo[0] + lo[1]) and int(lo[0], 16) == start:
            for field in lines[k + 1 :]:
                if field.startswith("Rss:"):
                    return int(field.split()[1]) * 1024 // os.sysconf("SC_PAGE_SIZE")
    raise AssertionError("mapping not found in /proc/self/smaps")


def test_allocate_faults_every_page_in_and_beats_between_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arena, "PIECE_BYTES", 1 << 20)
    size = (8 << 20) + 4096
    beats: list[int] = []
    name = _name()
    seg = allocate(name, size, lambda: beats.append(1), threads=2)
    try:
        unlink_segment(name)
        with memoryview(seg.buf) as mv:
            assert _resident_pages(mv) * os.sysconf("SC_PAGE_SIZE") >= size
            assert mv[0] == 0 and mv[size - 1] == 0 and bytes(mv[4096:8192]) == bytes(4096)
        assert beats
    finally:
        seg.close()
    assert open_segment_count() == 0


@pytest.mark.parametrize("err", [errno.EFAULT, errno.ENOMEM])
def test_allocate_without_memory_is_an_arena_error_and_leaves_no_segment(
    monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    """The kernel refusing pages (a full /dev/shm answers EFAULT) is a clear error before the load."""
    monkeypatch.setattr(arena, "_populate_piece", lambda addr, length, cancel=None: err)
    name = _name()
    with pytest.raises(ArenaError, match="cannot fault in 8192 bytes"):
        allocate(name, 8192, lambda: None)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert open_segment_count() == 0


def test_allocate_falls_back_to_touching_on_an_old_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arena, "_populate_piece", lambda addr, length, cancel=None: errno.EINVAL)
    name = _name()
    seg = allocate(name, 3 * 4096, lambda: None)
    try:
        unlink_segment(name)
        with memoryview(seg.buf) as mv:
            assert _resident_pages(mv) == 3 and bytes(mv) == bytes(3 * 4096)
    finally:
        seg.close()


def test_run_beside_beats_until_the_step_ends_and_returns_its_result() -> None:
    beats: list[float] = []
    assert run_beside(lambda: time.sleep(0.3) or 42, lambda: beats.append(time.monotonic()), 0.02) == 42
    assert len(beats) >= 3  # ~15 intervals; a loaded machine may run some late


def test_run_beside_raises_the_steps_exception_on_the_calling_thread() -> None:
    def step() -> None:
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        run_beside(step, lambda: None, 0.01)


def test_an_early_arena_is_resized_to_the_plan_keeping_its_pages() -> None:
    name = _name()
    early = EarlyArena(name, lambda: 3 << 20, threads=2)
    seg = early.take(2 << 20, lambda: None)
    try:
        assert seg is not None and seg.size == 2 << 20 == os.stat(f"/dev/shm/{name}").st_size
        with memoryview(seg.buf) as mv:
            mv[-1] = 7
        seg.resize(5 << 20)  # a bigger plan: the kept page keeps its byte, the new ones are zero
        with memoryview(seg.buf) as mv:
            assert mv[(2 << 20) - 1] == 7 and bytes(mv[2 << 20 :]) == bytes(3 << 20)
    finally:
        if seg is not None:
            seg.close()
        unlink_segment(name)
    assert open_segment_count() == 0


def test_an_early_arena_grows_and_faults_in_its_new_tail() -> None:
    name = _name()
    seg = EarlyArena(name, lambda: 1 << 20).take(3 << 20, lambda: None)
    try:
        assert seg is not None
        with memoryview(seg.buf) as mv:
            assert _resident_pages(mv) * os.sysconf("SC_PAGE_SIZE") >= 3 << 20
    finally:
        if seg is not None:
            seg.close()
        unlink_segment(name)


def test_an_early_arena_that_failed_or_had_no_size_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EarlyArena(_name(), lambda: None).take(4096, lambda: None) is None
    monkeypatch.setattr(arena, "_populate_piece", lambda addr, length, cancel=None: errno.ENOMEM)
    name = _name()
    assert EarlyArena(name, lambda: 8192).take(4096, lambda: None) is None
    assert not os.path.exists(f"/dev/shm/{name}")
    assert open_segment_count() == 0


def _shmem_pages(name: str) -> int:
    """Pages the tmpfs file of segment ``name`` holds (its blocks), mapped by anyone or not."""
    return os.stat(f"/dev/shm/{name}").st_blocks * 512 // os.sysconf("SC_PAGE_SIZE")


def test_a_handed_over_arena_keeps_its_pages_for_the_loader_to_adopt() -> None:
    """The supervisor's part (butterfly.loader.prewarm): the file keeps its faulted pages after the
    maker lets go; the first loader maps that very file (a byte written through it is there) and
    takes it to the plan's size."""
    name = _name()
    made = EarlyArena(name, lambda: 4 << 20, hand_over=True)
    made.wait(lambda: None)
    try:
        assert made.error is None and made.seg is None and open_segment_count() == 0
        assert _shmem_pages(name) * os.sysconf("SC_PAGE_SIZE") >= 4 << 20
        with open(f"/dev/shm/{name}", "r+b") as f:
            f.seek(100)
            f.write(b"\x05")
        adopted = EarlyArena(name, lambda: 4 << 20, adopt=True)
        seg = adopted.take(3 << 20, lambda: None)
        assert seg is not None and adopted.adopted and seg.size == 3 << 20
        try:
            with memoryview(seg.buf) as mv:
                assert mv[100] == 5
                assert _resident_pages(mv) * os.sysconf("SC_PAGE_SIZE") >= 3 << 20
        finally:
            seg.close()
    finally:
        unlink_segment(name)
    assert open_segment_count() == 0


def test_a_handed_over_arena_without_the_memory_says_so_and_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The supervisor's reservation meets a full /dev/shm: the error says so, no file of that name is
    left (the loader then makes its arena itself, and fails with its own clear error if it must)."""
    monkeypatch.setattr(arena, "_reserve_piece", lambda fd, off, length, cancel: errno.ENOSPC)
    name = _name()
    made = EarlyArena(name, lambda: 8 << 20, hand_over=True)
    made.wait(lambda: None)
    assert isinstance(made.error, ArenaError) and "/dev/shm is full" in str(made.error)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert open_segment_count() == 0


def test_adopting_where_no_arena_was_begun_makes_one() -> None:
    """The supervisor's arena never came (no manifest yet, no memory, or still being created: an empty
    file): the loader makes its own, zeroed and faulted in."""
    name = _name()
    seg = EarlyArena(name, lambda: 2 << 20, adopt=True).take(2 << 20, lambda: None)
    try:
        assert seg is not None
    finally:
        if seg is not None:
            seg.close()
        unlink_segment(name)
    with open(f"/dev/shm/{name}", "wb"):
        pass  # created, not yet sized
    early = EarlyArena(name, lambda: 2 << 20, adopt=True)
    seg = early.take(2 << 20, lambda: None)
    try:
        assert seg is not None and not early.adopted and seg.size == 2 << 20
        with memoryview(seg.buf) as mv:
            assert bytes(mv) == bytes(2 << 20)
    finally:
        if seg is not None:
            seg.close()
        unlink_segment(name)
    assert open_segment_count() == 0


def test_a_cancelled_early_arena_is_never_left_behind() -> None:
    """A node stopped in its first seconds cancels the supervisor's arena: made or not when the cancel
    comes, no file of that name is left once the maker is done (the supervisor then unlinks the name)."""
    name = _name()

    def size() -> int:
        time.sleep(0.05)  # the cancel comes before the arena exists
        return 256 << 20

    early = EarlyArena(name, size, hand_over=True)
    early.cancel()
    early.wait(lambda: None)
    assert isinstance(early.error, ArenaError) and "cancelled" in str(early.error)
    assert not os.path.exists(f"/dev/shm/{name}")
    assert open_segment_count() == 0


def test_waiting_for_an_arena_whose_size_never_comes_is_bounded() -> None:
    """The supervisor's arena takes its size from the manifest, read from the store: a store that hangs
    must not hang the node's stop, which waits a bounded time and goes on."""
    release = threading.Event()
    early = EarlyArena(_name(), lambda: (release.wait(10), None)[1], hand_over=True)
    early.cancel()
    t0 = time.monotonic()
    assert early.wait(lambda: None, timeout_s=0.2) is False
    assert time.monotonic() - t0 < 2
    release.set()
    assert early.wait(lambda: None, timeout_s=5) is True and early.error == "no size estimate"
    assert open_segment_count() == 0
