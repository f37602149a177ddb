"""RaftStorage: durable hard state and log, crash recovery of a torn last record, loud failure on
corruption in the middle, and a real Raft cluster restarting from it."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from raftsim import take

from butterfly.raft import (
    Entry,
    EntryKind,
    HardState,
    Message,
    RaftConfig,
    RaftNode,
    RaftStorage,
    Role,
    StorageCorrupt,
    bootstrap_state,
)
from butterfly.raft.storage import MAGIC, StorageError


def entry(index: int, term: int, data: bytes = b"") -> Entry:
    return Entry(index, term, EntryKind.NORMAL, data or b"%d@%d" % (index, term))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "raft.log"


def two_records(path: Path) -> tuple[int, int]:
    """Write two saves; the offsets where the second starts and the file ends."""
    with RaftStorage.open(path) as storage:
        storage.save(HardState(term=1, vote="a", commit=0), [entry(1, 1), entry(2, 1)])
        start = storage.file_size()
        storage.save(HardState(term=2, vote="b", commit=2), [entry(3, 2, b"x" * 40)])
        return start, storage.file_size()


def test_a_fresh_file_holds_nothing(path: Path) -> None:
    with RaftStorage.open(path) as storage:
        assert storage.load() is None and storage.recovered_torn_bytes == 0
    assert path.read_bytes() == MAGIC


def test_saved_state_survives_reopening(path: Path) -> None:
    two_records(path)
    with RaftStorage.open(path) as storage:
        state = storage.load()
    assert state is not None
    assert state.hard_state == HardState(term=2, vote="b", commit=2)
    assert state.entries == (entry(1, 1), entry(2, 1), entry(3, 2, b"x" * 40))


def test_a_conflicting_suffix_is_replaced_and_the_truncation_is_durable(path: Path) -> None:
    with RaftStorage.open(path) as storage:
        storage.save(HardState(term=1, commit=1), [entry(i, 1) for i in range(1, 6)])
        storage.save(HardState(term=3, commit=1), [entry(3, 3)])  # a new leader's entry at index 3
    with RaftStorage.open(path) as storage:
        state = storage.load()
    assert state is not None
    assert [(e.index, e.term) for e in state.entries] == [(1, 1), (2, 1), (3, 3)]


def test_save_refuses_what_raft_never_writes(path: Path) -> None:
    with RaftStorage.open(path) as storage:
        storage.save(HardState(term=1, commit=2), [entry(1, 1), entry(2, 1)])
        size = storage.file_size()
        with pytest.raises(ValueError, match="committed"):
            storage.save(None, [entry(2, 2)])
        with pytest.raises(ValueError, match="does not follow"):
            storage.save(None, [entry(4, 1)])
        with pytest.raises(ValueError, match="go back"):
            storage.save(HardState(term=1, commit=1), [])
        with pytest.raises(ValueError, match="past last index"):
            storage.save(HardState(term=1, commit=3), [])
        assert storage.file_size() == size, "a refused save writes nothing"


def test_save_fsyncs_after_writing_and_before_returning(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_write, real_fsync = os.write, os.fsync
    with RaftStorage.open(path) as storage:

        def write(fd: int, data: bytes) -> int:
            calls.append("write")
            return real_write(fd, data)

        def fsync(fd: int) -> None:
            calls.append("fsync")
            real_fsync(fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        storage.save(HardState(term=1), [entry(1, 1)])
        assert calls == ["write", "fsync"]


def test_a_failed_fsync_makes_the_storage_refuse_further_writes(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RaftStorage.open(path) as storage:

        def failing_fsync(fd: int) -> None:
            raise OSError(5, "EIO")

        monkeypatch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError):
            storage.save(HardState(term=1), [])
        monkeypatch.undo()
        with pytest.raises(StorageError, match="restart"):
            storage.save(HardState(term=2), [])


def test_a_write_torn_at_any_byte_of_the_last_record_is_cut_away(path: Path, tmp_path: Path) -> None:
    start, end = two_records(path)
    whole = path.read_bytes()
    for cut in range(start, end):
        copy = tmp_path / f"cut{cut}.log"
        copy.write_bytes(whole[:cut])
        with RaftStorage.open(copy) as storage:
            state = storage.load()
            assert storage.recovered_torn_bytes == cut - start
            assert state is not None
            assert state.hard_state == HardState(term=1, vote="a", commit=0), f"cut at {cut}"
            assert [e.index for e in state.entries] == [1, 2]
            storage.save(HardState(term=5, commit=1), [entry(3, 5)])  # life goes on after recovery
        assert copy.stat().st_size > start
        with RaftStorage.open(copy) as storage:
            state = storage.load()
            assert storage.recovered_torn_bytes == 0
            assert state is not None and state.hard_state.term == 5 and state.entries[-1] == entry(3, 5)
        copy.unlink()


@pytest.mark.parametrize("damage", ["zeros", "flipped byte"])
def test_a_damaged_last_record_is_treated_as_torn(path: Path, damage: str) -> None:
    start, end = two_records(path)
    data = bytearray(path.read_bytes())
    if damage == "zeros":
        data += bytes(4096)  # a crash after the filesystem grew the file but before data reached it
    else:
        data[end - 3] ^= 0x40  # the last record never fully reached the disk
    path.write_bytes(bytes(data))
    with RaftStorage.open(path) as storage:
        state = storage.load()
        assert state is not None
        if damage == "zeros":
            assert storage.recovered_torn_bytes == 4096 and state.hard_state.term == 2
        else:
            assert storage.recovered_torn_bytes == end - start and state.hard_state.term == 1


@pytest.mark.parametrize("where", ["payload", "length"])
def test_corruption_in_the_middle_is_an_error_naming_the_offset(path: Path, where: str) -> None:
    two_records(path)
    data = bytearray(path.read_bytes())
    first = len(MAGIC)
    if where == "payload":
        data[first + 12] ^= 0x01
    else:
        struct.pack_into(">I", data, first, 1_000_000)  # claims to run past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(StorageCorrupt, match=f"offset {first}") as info:
        RaftStorage.open(path)
    assert info.value.offset == first
    assert path.read_bytes() == bytes(data), "corrupt durable data is left for an operator, not cut"


@pytest.mark.parametrize("kept", range(len(MAGIC)))
def test_a_crash_while_creating_the_file_leaves_a_usable_empty_log(path: Path, kept: int) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(MAGIC[:kept])
    with RaftStorage.open(path) as storage:
        assert storage.load() is None and storage.recovered_torn_bytes == kept
        storage.save(HardState(term=1), [])
    with RaftStorage.open(path) as storage:
        assert storage.load() is not None


def test_a_file_that_is_not_a_raft_log_is_refused(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"hello world, not raft")
    with pytest.raises(StorageError, match="bad magic"):
        RaftStorage.open(path)


def test_a_second_process_cannot_open_the_same_log(path: Path) -> None:
    with RaftStorage.open(path), pytest.raises(StorageError, match="locked"):
        RaftStorage.open(path)


def test_compaction_keeps_the_live_state_and_drops_superseded_records(path: Path) -> None:
    with RaftStorage.open(path) as storage:
        storage.save(HardState(term=1), [entry(i, 1) for i in range(1, 11)])
        for commit in range(1, 11):
            storage.save(HardState(term=1, commit=commit), [])
        storage.save(HardState(term=2, commit=10), [entry(11, 2)])
        before_size, before = storage.file_size(), storage.load()
        storage.compact()
        assert storage.file_size() < before_size
        storage.save(HardState(term=2, commit=11), [])
    with RaftStorage.open(path) as storage:
        after = storage.load()
    assert before is not None and after is not None
    assert after.entries == before.entries and after.hard_state == HardState(term=2, commit=11)
    assert not path.with_name(path.name + ".compact").exists()


saves = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()),  # (drop, append, new hard state)
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(plan=saves, cut_fraction=st.floats(0, 1))
def test_after_a_crash_at_any_byte_the_state_is_exactly_that_after_some_prefix_of_saves(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[int, int, bool]], cut_fraction: float
) -> None:
    path = tmp_path_factory.mktemp("prop") / "raft.log"
    history: list[tuple[int, tuple[HardState | None, tuple[Entry, ...]]]] = []
    log: list[Entry] = []
    term = 1
    with RaftStorage.open(path) as storage:
        history.append((storage.file_size(), (None, ())))
        hard: HardState | None = None
        for drop, append, new_hard in plan:
            term += 1
            keep = max(0, len(log) - drop)
            new = [entry(i, term) for i in range(keep + 1, keep + 1 + append)]
            if keep < len(log) and not new:
                new = [entry(keep + 1, term)]  # Raft only truncates to replace
            if new_hard:
                hard = HardState(term=term, commit=0)
            if not new and not new_hard:
                continue
            storage.save(hard if new_hard else None, new)
            log = log[:keep] + new
            history.append((storage.file_size(), (hard, tuple(log))))
    end = history[-1][0]
    cut = len(MAGIC) + int((end - len(MAGIC)) * cut_fraction)
    with open(path, "r+b") as f:
        f.truncate(cut)
    expected_hard, expected_entries = [state for size, state in history if size <= cut][-1]
    with RaftStorage.open(path) as storage:
        loaded = storage.load()
    if expected_hard is None and not expected_entries:
        assert loaded is None
    else:
        assert loaded is not None
        assert loaded.entries == expected_entries
        assert loaded.hard_state == (expected_hard or HardState())


def test_a_cluster_restarts_from_raft_storage_with_nothing_lost(tmp_path: Path) -> None:
    """The whole loop a driver runs: save each Ready before sending its messages, then restart."""
    ids = ("n1", "n2", "n3")
    config = RaftConfig(election_ticks=10, heartbeat_ticks=1)
    stores = {n: RaftStorage.open(tmp_path / n / "raft.log") for n in ids}
    boot = bootstrap_state(ids, "c")
    for store in stores.values():
        store.save(boot.hard_state, boot.entries)

    def run(nodes: dict[str, RaftNode]) -> None:
        queue: list[Message] = []
        for _ in range(200):
            for node in nodes.values():
                node.tick()
            for _ in range(50):
                for n, node in nodes.items():
                    if node.has_ready():
                        rd = node.ready()
                        stores[n].save_ready(rd)  # durable first...
                        queue.extend(rd.messages)  # ...then sent
                        node.advance(rd)
                if not queue:
                    break
                while queue:
                    m = queue.pop(0)
                    nodes[m.dst].step(m)
            leader = next((x for x in nodes.values() if x.role is Role.LEADER), None)
            if leader is not None and leader.commit == leader.last_index and leader.last_index >= 4:
                return
            if leader is not None and leader.last_index < 4:
                leader.propose(b"plan")

    nodes = {n: RaftNode(n, config, stores[n].load(), i) for i, n in enumerate(ids)}
    run(nodes)
    before = {n: (node.term, node.vote, node.entries(1, 99), node.commit) for n, node in nodes.items()}
    for store in stores.values():
        store.close()
    stores.update({n: RaftStorage.open(tmp_path / n / "raft.log") for n in ids})
    restarted = {n: RaftNode(n, config, stores[n].load(), 10 + i) for i, n in enumerate(ids)}
    after = {n: (node.term, node.vote, node.entries(1, 99), node.commit) for n, node in restarted.items()}
    assert after == before
    assert any(e.data == b"plan" for e in restarted["n3"].entries(1, 99))
    assert [e.index for e in take(restarted["n2"]).committed_entries] == list(range(1, before["n2"][3] + 1))
    for store in stores.values():
        store.close()
