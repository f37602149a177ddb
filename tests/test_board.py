"""The status board: seqlock primitives (Cython and plain Python, same tests, and each against the
other), the layout and its string rules, Board create/attach/read/write/update with its error cases,
and the /dev/shm segment helpers including the clean-up after a killed supervisor.

Every test that goes through a seqlock runs once per implementation (``impl`` fixture). Tests of the
segment helpers and of pure layout encoding do not touch a seqlock and run once. An autouse fixture
fails any test that leaves a segment mapped or a name in /dev/shm.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from butterfly.board import (
    BOARD_SIZE,
    LAYOUT_VERSION,
    Board,
    BoardAttachError,
    ClusterSection,
    HeaderSection,
    LoaderSection,
    NodeSection,
    TornSectionError,
    ValidatorSection,
    attach_segment,
    create_segment,
    layout,
    open_segment_count,
    remove_stale_segments,
    segment_name,
    seqlock,
    shm,
    unlink_segment,
)
from butterfly.board.layout import SECTION_TYPES, EngineSection, layout_of, truncate_utf8
from butterfly.board.seqlock import SeqlockImpl

IMPL_NAMES = ["cython", "python"]
# Subprocesses import butterfly from the checkout, wherever pytest was started.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _impl(name: str) -> SeqlockImpl:
    if name == "cython" and seqlock.NATIVE is None:
        if os.environ.get("BUTTERFLY_NO_EXT"):
            pytest.skip("BUTTERFLY_NO_EXT=1: the Cython seqlock is not built")
        pytest.fail(
            "the Cython seqlock is not built (run `python setup.py build_ext --inplace`): "
            f"{seqlock.NATIVE_IMPORT_ERROR}"
        )
    return seqlock.get(name)  # type: ignore[arg-type]


@pytest.fixture(params=IMPL_NAMES)
def impl(request: pytest.FixtureRequest) -> SeqlockImpl:
    return _impl(request.param)


@pytest.fixture
def node_id() -> str:
    # Dashes inside the node id on purpose: the pid must still be found as the second-to-last field.
    return f"test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def no_leaks(node_id: str) -> Iterator[None]:
    before = open_segment_count()
    yield
    leftovers = [e for e in os.listdir(shm.SHM_DIR) if e.startswith(f"butterfly-{node_id}-")]
    for entry in leftovers:
        unlink_segment(entry)
    assert open_segment_count() == before, "a test left a segment mapped"
    assert not leftovers, f"a test left segments in /dev/shm: {leftovers}"


@pytest.fixture
def board_name(node_id: str) -> str:
    return segment_name(node_id, os.getpid(), "board")


@pytest.fixture
def board(board_name: str, impl: SeqlockImpl) -> Iterator[Board]:
    b = Board.create(board_name, "node-a", impl=impl, timeout_s=0.05)
    yield b
    b.close()
    b.unlink()


def _seq(buf: bytearray | mmap.mmap | memoryview, offset: int) -> int:
    value: int = struct.unpack_from("<Q", buf, offset)[0]
    return value


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- seqlock primitives ----------------------------------------------------------------------------


def test_seq_round_trip_and_counter_steps_by_two(impl: SeqlockImpl) -> None:
    buf = bytearray(64)
    for i in range(1, 4):
        payload = bytes([i]) * 24
        impl.seq_write(buf, 8, payload)
        assert _seq(buf, 8) == 2 * i
        assert impl.seq_read(buf, 8, 24, 1.0) == payload
        assert bytes(buf[16:40]) == payload, "payload sits right after the counter"
    assert bytes(buf[:8]) == bytes(8) and bytes(buf[40:]) == bytes(24), "nothing outside the section"
    assert impl.seq_read(buf, 8, 0, 1.0) == b""


def test_seq_on_mmap_and_read_only_source(impl: SeqlockImpl) -> None:
    with mmap.mmap(-1, 4096) as mm:
        impl.seq_write(mm, 4096 - 8 - 16, b"x" * 16)  # the very end of the buffer is in bounds
        assert impl.seq_read(mm, 4096 - 24, 16, 1.0) == b"x" * 16
        frozen = bytes(mm)
    assert impl.seq_read(frozen, 4096 - 24, 16, 1.0) == b"x" * 16, "readers accept read-only buffers"
    with pytest.raises(ValueError, match="read-only"):
        impl.seq_write(frozen, 0, b"x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-8, 8), (0, 57), (56, 1), (64, 0), (0, -1), (2**70, 8)],
)
def test_seq_bounds_are_checked(impl: SeqlockImpl, offset: int, length: int) -> None:
    buf = bytearray(64)
    with pytest.raises(ValueError, match="outside the buffer"):
        impl.seq_read(buf, offset, length, 1.0)
    if length >= 0:
        with pytest.raises(ValueError, match="outside the buffer"):
            impl.seq_write(buf, offset, bytes(length))
    assert buf == bytearray(64)


def test_seq_alignment_is_checked_on_the_real_address(impl: SeqlockImpl) -> None:
    with mmap.mmap(-1, 4096) as mm:
        for offset in (1, 4, 12):
            with pytest.raises(ValueError, match="aligned"):
                impl.seq_write(mm, offset, b"abc")
            with pytest.raises(ValueError, match="aligned"):
                impl.seq_read(mm, offset, 3, 1.0)
        view = memoryview(mm)[1:]  # starts one byte past a page boundary
        try:
            with pytest.raises(ValueError, match="aligned"):
                impl.seq_read(view, 0, 3, 1.0)
            impl.seq_write(view, 7, b"abc")  # 1 + 7 is aligned
            assert impl.seq_read(view, 7, 3, 1.0) == b"abc"
        finally:
            view.release()


def test_seq_rejects_bad_buffers_and_arguments(impl: SeqlockImpl) -> None:
    buf = bytearray(64)
    strided = memoryview(buf)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        impl.seq_read(strided, 0, 8, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        impl.seq_write(buf, 0, strided)
    strided.release()
    with pytest.raises(TypeError):
        impl.seq_read("not a buffer", 0, 1, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        impl.seq_write(buf, 0.0, b"x")  # type: ignore[arg-type]
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="timeout_s"):
            impl.seq_read(buf, 0, 8, bad)
    buf.extend(b"ok")  # no export was left behind: a bytearray cannot resize while exported


def test_seq_odd_counter_times_out_then_a_write_repairs_it(impl: SeqlockImpl) -> None:
    buf = bytearray(64)
    impl.seq_write(buf, 0, b"old-data")
    struct.pack_into("<Q", buf, 0, 5)  # a writer died after making the counter odd
    t0 = time.monotonic()
    with pytest.raises(TornSectionError, match="stayed odd") as info:
        impl.seq_read(buf, 0, 8, 0.2)
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 2.0
    assert info.value.seq == 5 and info.value.offset == 0 and info.value.timeout_s == 0.2
    with pytest.raises(TornSectionError):
        impl.seq_read(buf, 0, 8, 0.0)  # zero timeout: one attempt, no wait
    impl.seq_write(buf, 0, b"new-data")
    assert _seq(buf, 0) == 8, "odd 5 -> 7 (so readers see a change) -> 8"
    assert impl.seq_read(buf, 0, 8, 0.0) == b"new-data"


def test_seq_reader_waits_for_a_writer_to_finish(impl: SeqlockImpl) -> None:
    buf = bytearray(64)
    impl.seq_write(buf, 0, b"before..")
    struct.pack_into("<Q", buf, 0, 3)  # a write is in progress
    buf[8:12] = b"half"
    results: list[bytes | BaseException] = []

    def reader() -> None:
        try:
            results.append(impl.seq_read(buf, 0, 8, 10.0))
        except BaseException as exc:  # reported below
            results.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    assert not results, "the reader must not return a half-written payload"
    impl.seq_write(buf, 0, b"complete")
    thread.join(5.0)
    assert results == [b"complete"]


class _WriterStartsAfterFirstLoad:
    """Stands in for the twin's counter codec: the reader's first counter load returns the old even
    value, and then a writer starts (odd counter, half the new payload) before the reader copies;
    the writer finishes once the reader has spun a few times. Only the re-check can catch this."""

    def __init__(self, real: struct.Struct, buf: bytearray) -> None:
        self.real, self.buf, self.loads = real, buf, 0
        self.size = real.size

    def pack_into(self, *args: object) -> None:
        self.real.pack_into(*args)  # type: ignore[arg-type]

    def unpack_from(self, buffer: object, offset: int = 0) -> tuple[int, ...]:
        value: tuple[int, ...] = self.real.unpack_from(buffer, offset)  # type: ignore[arg-type]
        self.loads += 1
        if self.loads == 1:
            struct.pack_into("<Q", self.buf, 0, value[0] + 1)
            self.buf[8:12] = b"NEW!"
        elif self.loads == 4:
            self.buf[12:16] = b"new!"
            struct.pack_into("<Q", self.buf, 0, value[0] + 1)
        return value


def test_python_reader_rechecks_the_counter_after_copying(monkeypatch: pytest.MonkeyPatch) -> None:
    # White box and Python only: the Cython reader has no hook between its load and its copy; the
    # same interleaving is what the multi-process hammer provokes there (it fails without the check).
    from butterfly.board import _seqlock_py

    buf = bytearray(16)
    _seqlock_py.seq_write(buf, 0, b"old-old-")
    monkeypatch.setattr(_seqlock_py, "_SEQ", _WriterStartsAfterFirstLoad(_seqlock_py._SEQ, buf))
    assert _seqlock_py.seq_read(buf, 0, 8, 5.0) == b"NEW!new!", "never the mix b'NEW!old-'"


@pytest.mark.parametrize(("writer", "reader"), [("cython", "python"), ("python", "cython")])
def test_seq_cross_implementation(writer: str, reader: str) -> None:
    w, r = _impl(writer), _impl(reader)
    ours, theirs = bytearray(128), bytearray(128)
    for i, payload in enumerate([b"a" * 40, b"\x00\xff" * 20, bytes(range(40))]):
        w.seq_write(ours, 64, payload)
        r.seq_write(theirs, 64, payload)
        assert ours == theirs, "identical byte format, counter included"
        assert r.seq_read(ours, 64, 40, 1.0) == payload
        assert w.seq_read(theirs, 64, 40, 1.0) == payload
        assert _seq(ours, 64) == 2 * (i + 1)
    struct.pack_into("<Q", ours, 64, 9)
    with pytest.raises(TornSectionError) as torn_r:
        r.seq_read(ours, 64, 40, 0.0)
    with pytest.raises(TornSectionError) as torn_w:
        w.seq_read(ours, 64, 40, 0.0)
    assert str(torn_r.value) == str(torn_w.value)


def test_implementation_selection() -> None:
    assert seqlock.IMPLEMENTATION in ("cython", "python")
    code = "import butterfly.board as b; print(b.IMPLEMENTATION)"
    env = dict(os.environ, BUTTERFLY_PURE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "python"
    if seqlock.NATIVE is not None:
        env.pop("BUTTERFLY_PURE")
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO
        )
        assert out.stdout.strip() == "cython"
        # The extension imported first (no import cycle through butterfly.board) still raises the
        # package's own TornSectionError.
        first = (
            "import butterfly._native.board as n, butterfly.board as b\n"
            "try:\n"
            "    n.seq_read(bytearray(b'\\x01' + bytes(15)), 0, 8, 0.0)\n"
            "except b.TornSectionError as e:\n"
            "    print(e.seq)\n"
        )
        out = subprocess.run([sys.executable, "-c", first], env=env, capture_output=True, text=True, cwd=REPO)
        assert (out.returncode, out.stdout.strip()) == (0, "1"), out.stderr
    with pytest.raises(ValueError):
        seqlock.get("rust")  # type: ignore[arg-type]


# -- layout ------------------------------------------------------------------------------------------


def test_layout_sizes_and_alignment() -> None:
    payloads = {
        HeaderSection: 84,
        NodeSection: 140,
        ClusterSection: 186,
        LoaderSection: 69,
        ValidatorSection: 130,
        EngineSection: 45,
    }
    offset = 0
    for cls in SECTION_TYPES:
        lay = layout_of(cls)
        assert lay.payload_size == payloads[cls]
        assert lay.offset == offset and lay.offset % 64 == 0
        assert lay.size % 64 == 0 and lay.size >= 8 + lay.payload_size
        assert [f.name for f in lay.fields] == [f.name for f in dataclasses.fields(cls)]
        offset += lay.size
    assert BOARD_SIZE == offset == 960


def test_adding_a_field_is_one_annotation() -> None:
    @dataclasses.dataclass(frozen=True)
    class Extended(LoaderSection):
        shards_done: layout.U32 = 0

    base = layout._build_layout(LoaderSection, 0)
    grown = layout._build_layout(Extended, 0)
    assert grown.payload_size == base.payload_size + 4
    assert grown.fields[-1].name == "shards_done" and grown.fields[-1].offset == base.payload_size
    sample = Extended(pid=7, shards_done=3)
    assert grown.decode(grown.encode(sample)) == sample

    @dataclasses.dataclass(frozen=True)
    class Untyped(layout.Section):
        oops: int = 0

    with pytest.raises(TypeError, match="no board encoding"):
        layout._build_layout(Untyped, 0)


@pytest.mark.parametrize(
    ("text", "size", "expected"),
    [
        ("abc", 8, b"abc"),
        ("a" * 8, 8, b"a" * 8),
        ("a" * 9, 8, b"a" * 8),
        ("a" + "é" * 4, 8, ("a" + "é" * 3).encode()),  # 1 + 2*3 = 7; the 4th é would need 9
        ("€€€", 8, "€€".encode()),  # 3-byte chars: 6 fits, 9 does not
        ("x😀😀", 8, "x😀".encode()),  # 4-byte chars
        ("😀😀", 8, "😀😀".encode()),  # exactly full
        ("bad\udcff", 8, b"bad?"),  # a lone surrogate is replaced, not an error
    ],
)
def test_truncate_utf8(text: str, size: int, expected: bytes) -> None:
    got = truncate_utf8(text, size)
    assert got == expected
    got.decode("utf-8")  # always valid UTF-8


def test_encode_errors_name_the_field() -> None:
    node = layout_of(NodeSection)
    with pytest.raises(ValueError, match="state"):
        node.encode(NodeSection(state=256))
    with pytest.raises(ValueError, match="child_restarts"):
        node.encode(NodeSection(child_restarts=-1))
    with pytest.raises(ValueError, match="phase_durations"):
        node.encode(NodeSection(phase_durations=(1.0,)))
    with pytest.raises(TypeError, match="error_source"):
        node.encode(NodeSection(error_source=b"bytes"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer_start"):
        layout_of(LoaderSection).encode(LoaderSection(layer_start=2**31))
    with pytest.raises(TypeError, match="LoaderSection"):
        node.encode(LoaderSection())


# -- board -----------------------------------------------------------------------------------------


def test_create_then_attach_sees_header_and_defaults(board: Board, impl: SeqlockImpl) -> None:
    reader = Board.attach(board.name, writable=False, impl=impl)
    try:
        snap = reader.snapshot()
        assert snap.header.node_id == "node-a"
        assert snap.header.supervisor_pid == os.getpid()
        assert snap.header.layout_version == LAYOUT_VERSION
        assert abs(snap.header.created_unix - time.time()) < 60
        assert snap.node == NodeSection() and snap.node.phase_durations == (-1.0,) * 8
        assert (snap.cluster, snap.loader, snap.validator) == (
            ClusterSection(),
            LoaderSection(),
            ValidatorSection(),
        )
        assert board.path == os.path.join("/dev/shm", board.name) and reader.name == board.name
        assert os.stat(board.path).st_size == BOARD_SIZE
        assert stat.S_IMODE(os.stat(board.path).st_mode) == 0o600
        with open(board.path, "rb") as f:
            assert f.read(12)[8:] == b"BFLY"
    finally:
        reader.close()


def test_every_field_round_trips_at_its_limits(board: Board, impl: SeqlockImpl) -> None:
    samples = [
        NodeSection(
            state=5,
            phase=7,
            load_step=255,
            watchdog_ok=1,
            started_mono_ns=2**64 - 1,
            phase_started_mono_ns=123,
            phase_durations=(0.0, 1.5, -1.0, 1e300, -0.0, 2.25, 3.0, math.inf),
            error_source="l" * 32,
            child_restarts=2**32 - 1,
            serving_epoch=2**64 - 1,
            heartbeat_mono_ns=5,
            repairs=2**32 - 1,
        ),
        ClusterSection(
            heartbeat_mono_ns=1,
            pid=2**31,
            cluster_size=7,
            operational_nodes=5,
            quorum_size=4,
            term=2**63,
            epoch=9,
            coordinator="node-c",
            is_coordinator=1,
            model_root="ab" * 32,
        ),
        LoaderSection(1, 2, 3, 4, 5, 6, 7.5, 8, -(2**31), 2**31 - 1, 11),
        ValidatorSection(1, 2, 3, 4, "root", 2**32 - 1, 1, 1, 2**64 - 1, 7, 0.25, 600.5),
    ]
    other = Board.attach(board.name, impl=impl)
    try:
        for section in samples:
            board.write(section)
            assert board.read(type(section)) == section
            assert other.read(type(section)) == section
    finally:
        other.close()


def test_strings_are_truncated_on_a_character_boundary(board: Board) -> None:
    written = board.update(ClusterSection, coordinator="a" + "😀" * 20, model_root="ok")
    got = board.read(ClusterSection)
    assert got.coordinator == "a" + "😀" * 15  # 1 + 4*15 = 61 bytes; a 16th would need 65
    assert written.coordinator == "a" + "😀" * 20, "update returns what was asked; the board holds the cut"
    lay = layout_of(ClusterSection)
    spec = next(f for f in lay.fields if f.name == "coordinator")
    with open(board.path, "rb") as f:
        f.seek(lay.offset + 8 + spec.offset)
        raw = f.read(spec.size)
    assert raw.rstrip(b"\0").decode("utf-8") == got.coordinator
    assert raw.endswith(b"\0" * 3), "NUL padded"


def test_update_keeps_the_writers_copy_and_starts_from_the_board(board: Board, impl: SeqlockImpl) -> None:
    first = board.update(LoaderSection, pid=11, bytes_total=100)
    second = board.update(LoaderSection, bytes_done=40)
    assert second == dataclasses.replace(first, bytes_done=40) == board.read(LoaderSection)
    # A restarted loader attaches anew: its first update starts from what its predecessor wrote.
    successor = Board.attach(board.name, impl=impl)
    try:
        resumed = successor.update(LoaderSection, pid=12)
        assert (resumed.pid, resumed.bytes_done, resumed.bytes_total) == (12, 40, 100)
        assert board.read(LoaderSection) == resumed
        with pytest.raises(TypeError, match="no field"):
            successor.update(LoaderSection, bogus=1)
        with pytest.raises(ValueError, match="header"):
            successor.update(HeaderSection, node_id="x")
        with pytest.raises(ValueError, match="header"):
            successor.write(HeaderSection())
        with pytest.raises(ValueError, match="step"):
            successor.update(LoaderSection, step=300)
        assert board.read(LoaderSection) == resumed, "a rejected write changes nothing"
    finally:
        successor.close()


def test_torn_section_names_board_and_section_and_successor_repairs_it(
    board: Board, impl: SeqlockImpl
) -> None:
    board.update(LoaderSection, bytes_done=7)
    offset = layout_of(LoaderSection).offset
    with open(board.path, "r+b") as f:  # the loader died between "odd" and "even"
        f.seek(offset)
        f.write(struct.pack("<Q", 3))
    with pytest.raises(TornSectionError, match="section loader") as info:
        board.read(LoaderSection)
    assert board.name in str(info.value)
    with pytest.raises(TornSectionError):
        board.snapshot()
    assert board.read(NodeSection) == NodeSection(), "other sections stay readable"
    successor = Board.attach(board.name, impl=impl, timeout_s=0.05)
    try:
        resumed = successor.update(LoaderSection, pid=99)
        assert resumed.bytes_done == 7, "the stable bytes of the dead writer are kept"
        assert board.read(LoaderSection) == resumed
    finally:
        successor.close()


def test_read_only_attach_cannot_write(board: Board, impl: SeqlockImpl) -> None:
    reader = Board.attach(board.name, writable=False, impl=impl)
    try:
        with pytest.raises(ValueError, match="read-only"):
            reader.write(NodeSection(state=1))
        board.write(NodeSection(state=2))
        assert reader.read(NodeSection).state == 2
    finally:
        reader.close()


def test_board_cross_implementation(board_name: str) -> None:
    for writer_name, reader_name in [("cython", "python"), ("python", "cython")]:
        writer = Board.create(board_name, "n", impl=_impl(writer_name))
        reader = Board.attach(board_name, impl=_impl(reader_name))
        try:
            section = ClusterSection(term=5, coordinator="ü" * 40, model_root="x")
            writer.write(section)
            # 40 two-byte characters do not fit in 64 bytes: the board holds the first 32.
            assert reader.read(ClusterSection) == dataclasses.replace(section, coordinator="ü" * 32)
            reader.update(ValidatorSection, mismatches=3)
            assert writer.read(ValidatorSection).mismatches == 3
        finally:
            reader.close()
            writer.close()
            writer.unlink()


def test_attach_errors_are_clear(board_name: str, node_id: str, impl: SeqlockImpl) -> None:
    with pytest.raises(FileNotFoundError):
        Board.attach(board_name, impl=impl)

    def attach_error(name: str) -> str:
        with pytest.raises(BoardAttachError) as info:
            Board.attach(name, impl=impl, timeout_s=0.05)
        assert info.value.segment == name and name in str(info.value)
        return info.value.reason

    foreign = segment_name(node_id, os.getpid(), "arena")
    seg = create_segment(foreign, BOARD_SIZE)
    try:
        seg.buf[:16] = b"\xff" * 16  # odd "seq", junk magic: must be reported as foreign, fast
        t0 = time.monotonic()
        assert "bad magic" in attach_error(foreign)
        assert time.monotonic() - t0 < 0.05 + 1.0
    finally:
        seg.close()
        unlink_segment(foreign)

    seg = create_segment(foreign, 16)
    try:
        assert "too short" in attach_error(foreign)
    finally:
        seg.close()
        unlink_segment(foreign)

    fd = os.open(os.path.join("/dev/shm", foreign), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        assert "empty" in attach_error(foreign)
    finally:
        unlink_segment(foreign)

    good = Board.create(board_name, "n", impl=impl)
    try:
        header = layout_of(HeaderSection)
        with open(good.path, "r+b") as f:
            f.seek(8)
            f.write(header.encode(HeaderSection(layout_version=99, node_id="n")))
        assert "layout version 99" in attach_error(board_name)
        with open(good.path, "r+b") as f:
            f.write(struct.pack("<Q", 7))  # seq odd over a valid magic: the creator died writing it
            f.seek(8)
            f.write(header.encode(HeaderSection(node_id="n")))
        assert "torn" in attach_error(board_name)
        with open(good.path, "r+b") as f:
            f.write(struct.pack("<Q", 8))
            f.truncate(BOARD_SIZE + 64)
        assert f"needs {BOARD_SIZE}" in attach_error(board_name)
    finally:
        good.close()
        good.unlink()


def test_create_refuses_an_existing_name(board: Board, impl: SeqlockImpl) -> None:
    board.update(NodeSection, state=3)
    with pytest.raises(FileExistsError):
        Board.create(board.name, "intruder", impl=impl)
    assert board.read(HeaderSection).node_id == "node-a"
    assert board.read(NodeSection).state == 3


def test_close_and_unlink_lifecycle(board_name: str, impl: SeqlockImpl) -> None:
    base = open_segment_count()
    b = Board.create(board_name, "n", impl=impl)
    readers = [Board.attach(board_name, impl=impl) for _ in range(2)]
    assert open_segment_count() == base + 3
    with pytest.raises(ValueError, match="timeout_s"):
        Board.attach(board_name, impl=impl, timeout_s=-1.0)  # the header read fails, nothing leaks
    assert open_segment_count() == base + 3
    for r in readers:
        r.close()
        r.close()  # idempotent
    assert b.unlink() is True
    b.write(NodeSection(state=1))  # the mapping outlives the name
    assert b.read(NodeSection).state == 1
    assert b.unlink() is False
    b.close()
    assert b.closed and open_segment_count() == base
    with pytest.raises(ValueError, match="closed"):
        b.read(NodeSection)


# -- segments --------------------------------------------------------------------------------------


def test_segment_names_are_validated(node_id: str) -> None:
    assert segment_name("n-1", 42, "arena") == "butterfly-n-1-42-arena"
    for bad_node in ("", "a/b", "a\0b", "x" * 300):
        with pytest.raises(ValueError):
            segment_name(bad_node, 1, "board")
    with pytest.raises(ValueError):
        segment_name(node_id, 0, "board")
    with pytest.raises(ValueError):
        segment_name(node_id, 1, "heap")  # type: ignore[arg-type]


def test_segments_share_memory_and_count_mappings(node_id: str) -> None:
    name = segment_name(node_id, os.getpid(), "arena")
    base = open_segment_count()
    with create_segment(name, 1 << 20, prefault=True) as a:
        with pytest.raises(FileExistsError):
            create_segment(name, 4096)
        with attach_segment(name) as b, attach_segment(name, writable=False) as c:
            assert (b.size, c.size) == (1 << 20, 1 << 20)
            assert open_segment_count() == base + 3
            a.buf[100:105] = b"hello"
            assert c.buf[100:105] == b"hello"
            with pytest.raises(TypeError):
                c.buf[0:1] = b"x"  # read-only mapping
            view = memoryview(b.buf)
            with pytest.raises(BufferError):
                b.close()  # unmapping under a live view would be a segfault later
            assert not b.closed and open_segment_count() == base + 3
            view.release()
    assert open_segment_count() == base
    assert unlink_segment(name) is True and unlink_segment(name) is False
    with pytest.raises(FileNotFoundError):
        attach_segment(name)


def test_remove_stale_segments(node_id: str) -> None:
    dead, live = _dead_pid(), os.getpid()
    other_node = f"{node_id}-b"  # extends our node id: must not be mistaken for ours
    names = {
        "dead_board": segment_name(node_id, dead, "board"),
        "dead_arena": segment_name(node_id, dead, "arena"),
        "live_board": segment_name(node_id, live, "board"),
        "live_arena": segment_name(node_id, live, "arena"),
        "other_dead": segment_name(other_node, dead, "board"),
        "odd_kind": f"butterfly-{node_id}-{dead}-scratch",
    }
    for name in names.values():
        create_segment(name, 64).close()
    try:
        removed = remove_stale_segments(node_id)
        assert removed == sorted([names["dead_board"], names["dead_arena"]])
        present = set(os.listdir(shm.SHM_DIR))
        assert names["dead_board"] not in present and names["dead_arena"] not in present
        for key in ("live_board", "live_arena", "other_dead", "odd_kind"):
            assert names[key] in present, key
        assert remove_stale_segments(node_id) == []
        assert remove_stale_segments(other_node) == [names["other_dead"]]
    finally:
        for name in names.values():
            unlink_segment(name)


def test_orphaned_segments_of_any_node_id_are_reclaimed_once_old(node_id: str) -> None:
    """A node killed and started again under another id (or never again) left its arena behind."""
    from butterfly.board.shm import remove_orphaned_segments

    dead, live = _dead_pid(), os.getpid()
    names = {
        "renamed_board": segment_name(f"{node_id}-old", dead, "board"),
        "renamed_arena": segment_name(f"{node_id}-old", dead, "arena"),
        "live_other": segment_name(f"{node_id}-other", live, "board"),
        "odd_kind": f"butterfly-{node_id}-x-{dead}-scratch",
    }
    for name in names.values():
        create_segment(name, 64).close()
    try:
        # Just written: kept (a node may be starting this moment), however dead its creator.
        assert not set(remove_orphaned_segments(60.0)) & set(names.values())
        later = time.time() + 120.0
        removed = remove_orphaned_segments(60.0, now_unix=later)
        assert sorted(set(removed) & set(names.values())) == sorted(
            [names["renamed_board"], names["renamed_arena"]]
        )
        present = set(os.listdir(shm.SHM_DIR))
        assert names["live_other"] in present and names["odd_kind"] in present
    finally:
        for name in names.values():
            unlink_segment(name)
