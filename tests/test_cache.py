"""The weight cache: atomic verified stores, lookups, quarantine, dead writers' temp files, the lock."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import blake3
import pytest

from butterfly.weights.cache import (
    CacheBusy,
    CacheError,
    ClearResult,
    WeightCache,
    clear_cache,
    lock_exclusive,
    lock_shared,
)

DATA = bytes(range(256)) * 1000
DIGEST = blake3.blake3(DATA).hexdigest()
ROOT = Path(__file__).resolve().parent.parent


def _other(n: int) -> tuple[bytes, str]:
    data = n.to_bytes(4, "little") * (1000 + n)
    return data, blake3.blake3(data).hexdigest()


def _tmp_files(cache: WeightCache) -> list[str]:
    return sorted(os.listdir(cache.tmp_dir))


def _python(code: str) -> subprocess.Popen[str]:
    """A child Python running ``code`` with the project importable; it prints lines we wait for."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_store_lookup_open_verify(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path / "c")
    assert cache.lookup(DIGEST, len(DATA)) is None
    path = cache.store_from_buffer(DIGEST, memoryview(DATA))
    assert path == tmp_path / "c" / "blake3" / DIGEST[:2] / DIGEST
    assert path.read_bytes() == DATA
    assert cache.lookup(DIGEST, len(DATA)) == path
    fd = cache.open_for_read(DIGEST)
    try:
        assert os.pread(fd, 10, 256) == DATA[256:266]
        # The descriptor keeps its bytes even after the entry is removed.
        assert cache.remove(DIGEST)
        assert os.pread(fd, 4, 0) == DATA[:4]
    finally:
        os.close(fd)
    assert not cache.remove(DIGEST)
    with pytest.raises(FileNotFoundError):
        cache.open_for_read(DIGEST)
    cache.store_from_buffer(DIGEST, bytearray(DATA))
    assert cache.verify(DIGEST)
    assert _tmp_files(cache) == []


def test_refuses_to_store_wrong_bytes(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    wrong = bytearray(DATA)
    wrong[500] ^= 1
    with pytest.raises(CacheError, match="refusing to store"):
        cache.store_from_buffer(DIGEST, wrong)
    assert cache.lookup(DIGEST, len(DATA)) is None
    assert _tmp_files(cache) == [] and cache.stats().entries == 0


@pytest.mark.parametrize("bad", ["../" * 10 + "etc/passwd", DIGEST.upper(), DIGEST[:-1], DIGEST + "0", ""])
def test_digest_must_be_64_lowercase_hex(tmp_path: Path, bad: str) -> None:
    cache = WeightCache(tmp_path)
    for call in (
        lambda: cache.lookup(bad, 1),
        lambda: cache.store_from_buffer(bad, b"x"),
        lambda: cache.remove(bad),
    ):
        with pytest.raises(ValueError, match="not a BLAKE3 hex digest"):
            call()


def test_lookup_removes_a_wrong_sized_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = WeightCache(tmp_path)
    path = cache.store_from_buffer(DIGEST, DATA)
    with open(path, "r+b") as f:
        f.truncate(len(DATA) - 1)  # a partial entry, as a disk error or a foreign writer might leave
    with caplog.at_level(logging.WARNING, logger="butterfly.weights.cache"):
        assert cache.lookup(DIGEST, len(DATA)) is None
    assert not path.exists()
    assert f"{len(DATA) - 1} bytes, the manifest says {len(DATA)}" in caplog.text


def test_corrupt_entry_fails_verify_and_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WeightCache(tmp_path)
    path = cache.store_from_buffer(DIGEST, DATA)
    with open(path, "r+b") as f:
        f.seek(1234)
        f.write(b"\xff")
    # Right size: lookup hands it out (the loader's inline chunk check catches it), verify does not.
    assert cache.lookup(DIGEST, len(DATA)) == path
    assert not cache.verify(DIGEST)
    with caplog.at_level(logging.WARNING, logger="butterfly.weights.cache"):
        cache.quarantine(DIGEST, "chunk at tensor offset 0 has the wrong xxh3")
    assert "removed: chunk at tensor offset 0 has the wrong xxh3" in caplog.text
    assert cache.lookup(DIGEST, len(DATA)) is None and not cache.verify(DIGEST)
    # Re-fetched and stored again: whole and right.
    cache.store_from_buffer(DIGEST, DATA)
    assert cache.verify(DIGEST)


def test_storing_again_repairs_a_bad_entry(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    path = cache.store_from_buffer(DIGEST, DATA)
    path.write_bytes(b"\0" * len(DATA))
    cache.store_from_buffer(DIGEST, DATA)
    assert cache.verify(DIGEST)


def test_crash_between_write_and_rename_leaves_no_entry(tmp_path: Path) -> None:
    cache_dir = tmp_path / "c"
    child = _python(
        f"""
        import os, signal, sys
        from pathlib import Path
        import butterfly.weights.cache as cache
        c = cache.WeightCache(Path({str(cache_dir)!r}))
        def crash(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)  # dies with the temp file written and fsync'd
        cache.os.replace = crash
        c.store_from_buffer({DIGEST!r}, bytes(range(256)) * 1000)
        """
    )
    child.communicate(timeout=60)
    assert child.returncode == -9
    stale = os.listdir(cache_dir / "tmp")
    assert len(stale) == 1 and stale[0].startswith(DIGEST)
    assert (cache_dir / "tmp" / stale[0]).stat().st_size == len(DATA)
    # No visible entry, to a cache opened before or after the crash...
    cache = WeightCache(cache_dir)  # ...and opening it removes the dead writer's temp file.
    assert cache.lookup(DIGEST, len(DATA)) is None
    assert _tmp_files(cache) == []
    assert cache.stats().entries == 0


def test_a_live_writers_temp_file_is_kept(tmp_path: Path) -> None:
    cache_dir = tmp_path / "c"
    WeightCache(cache_dir)
    child = _python(
        f"""
        import sys
        from pathlib import Path
        from butterfly.weights.cache import WeightCache
        fd, tmp = WeightCache(Path({str(cache_dir)!r}))._create_tmp({DIGEST!r})
        print(tmp, flush=True)
        sys.stdin.read()  # holds the temp file's flock until told to go
        """
    )
    try:
        assert child.stdout is not None
        tmp = Path(child.stdout.readline().strip())
        cache = WeightCache(cache_dir)
        assert cache.clean_tmp() == 0 and tmp.exists()
    finally:
        child.communicate(input="", timeout=60)
    assert cache.clean_tmp() == 1 and not tmp.exists()


def test_unrelated_files_in_tmp_are_not_touched(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    (cache.tmp_dir / "notes.txt").write_text("mine")
    assert cache.clean_tmp() == 0
    assert (cache.tmp_dir / "notes.txt").exists()


def test_concurrent_stores_of_the_same_digest(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    data = bytes(range(256)) * 16384  # 4 MiB, so the writes overlap in time
    digest = blake3.blake3(data).hexdigest()
    barrier = threading.Barrier(8)
    paths: list[Path] = []
    errors: list[BaseException] = []

    def store() -> None:
        try:
            barrier.wait()
            paths.append(cache.store_from_buffer(digest, memoryview(data)))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=store) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(paths)) == 1 and cache.verify(digest)
    assert cache.stats().entries == 1 and _tmp_files(cache) == []


def test_stats_and_entries(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    stored = dict(_other(n)[::-1] for n in range(5))
    for digest, data in stored.items():
        cache.store_from_buffer(digest, data)
    stats = cache.stats()
    assert stats.entries == 5 and stats.bytes == sum(len(d) for d in stored.values())
    assert dict(cache.entries()) == {d: len(b) for d, b in stored.items()}


def test_clear_cache_removes_entries_only(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    stored = dict(_other(n)[::-1] for n in range(3))
    for digest, data in stored.items():
        cache.store_from_buffer(digest, data)
    stray = cache.entries_dir / "zz"
    stray.mkdir()
    (stray / "keep.txt").write_text("not an entry")
    result = clear_cache(tmp_path)
    assert sorted(result.removed) == sorted((d, len(b)) for d, b in stored.items())
    assert result.bytes_freed == sum(len(b) for b in stored.values())
    assert result.left_alone == [stray]
    assert (stray / "keep.txt").exists()
    assert cache.stats().entries == 0
    assert sorted(p.name for p in cache.entries_dir.iterdir()) == ["zz"]  # emptied shard dirs removed
    assert clear_cache(tmp_path).removed == []


def test_clear_cache_refuses_while_a_node_holds_the_lock(tmp_path: Path) -> None:
    cache = WeightCache(tmp_path)
    cache.store_from_buffer(DIGEST, DATA)
    holder = _python(
        f"""
        import sys
        from pathlib import Path
        from butterfly.weights.cache import lock_shared
        lock = lock_shared(Path({str(tmp_path)!r}))
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheBusy):
            clear_cache(tmp_path)
        assert cache.lookup(DIGEST, len(DATA)) is not None
        with lock_shared(tmp_path, blocking=False):  # nodes share it among themselves
            pass
    finally:
        holder.communicate(input="", timeout=60)
    assert [d for d, _ in clear_cache(tmp_path).removed] == [DIGEST]


def test_a_node_cannot_start_during_a_clear(tmp_path: Path) -> None:
    WeightCache(tmp_path)
    with lock_exclusive(tmp_path), pytest.raises(CacheBusy):
        lock_shared(tmp_path, blocking=False)
    lock_shared(tmp_path, blocking=False).release()


def test_clear_cache_of_a_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        clear_cache(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_clear_cache_of_a_directory_that_is_no_cache_changes_nothing(tmp_path: Path) -> None:
    # A mistyped --cache-dir (a home directory) used to get a .lock file left in it.
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"is not a weight cache \(it has no blake3/, tmp/ or .lock\)"):
        clear_cache(home)
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"  # as tmpfiles makes it before the node's first start
    empty.mkdir()
    assert clear_cache(empty) == ClearResult()
    assert list(empty.iterdir()) == []


def test_something_else_at_an_entry_path_is_not_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = WeightCache(tmp_path)
    (cache.entries_dir / DIGEST[:2] / DIGEST).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="butterfly.weights.cache"):
        assert cache.lookup(DIGEST, len(DATA)) is None
    assert "could not be removed" in caplog.text and "not a regular file" in caplog.text
    assert not cache.verify(DIGEST)


def test_typed_buffers_are_stored_as_their_bytes(tmp_path: Path) -> None:
    import numpy as np

    arr = np.arange(3000, dtype=np.float16).reshape(30, 100)  # a memoryview of it has 3000 items, 6000 bytes
    digest = blake3.blake3(arr.tobytes()).hexdigest()
    cache = WeightCache(tmp_path)
    path = cache.store_from_buffer(digest, arr.data)
    assert path.read_bytes() == arr.tobytes() and cache.lookup(digest, arr.nbytes) == path


def test_a_write_behind_killed_mid_write_leaves_only_whole_entries(tmp_path: Path) -> None:
    """The loader's write-behind (butterfly.loader.writebehind) SIGKILLed while it stores tensors: what
    is in the cache afterwards is whole and right, and the dead writer's temp file goes away."""
    cache_dir = tmp_path / "c"
    tensors, size = 8, 1 << 22
    child = _python(
        f"""
        import os, time
        from pathlib import Path
        import blake3
        from butterfly.weights.cache import WeightCache
        from butterfly.loader.writebehind import Pending, WriteBehind
        fsync = os.fsync
        def slow_fsync(fd):  # each store sits in its temp file a while: the kill lands mid-write
            time.sleep(0.1)
            fsync(fd)
        os.fsync = slow_fsync
        buf = bytearray(b"".join(bytes([k]) * {size} for k in range({tensors})))
        def digest(k):
            return blake3.blake3(buf[k * {size}:(k + 1) * {size}]).hexdigest()
        items = [Pending(f"t{{k}}", digest(k), k * {size}, {size}) for k in range({tensors})]
        w = WriteBehind(WeightCache(Path({str(cache_dir)!r})), lambda: memoryview(buf), items)
        w.start()
        time.sleep(600)
        """
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            entries = list((cache_dir / "blake3").rglob("*")) if (cache_dir / "blake3").exists() else []
            if sum(p.is_file() for p in entries) >= 2 and os.listdir(cache_dir / "tmp"):
                break
            time.sleep(0.005)
        child.kill()
    finally:
        child.communicate(timeout=60)
    cache = WeightCache(cache_dir)  # removes the dead writer's temp file
    assert _tmp_files(cache) == []
    stored = list(cache.entries())
    assert 2 <= len(stored) < tensors
    assert all(length == size and cache.verify(digest) for digest, length in stored)
