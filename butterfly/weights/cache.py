"""The local weight cache: tensors stored by content, written atomically, verified before they are kept.

Layout under ``cache_dir``::

    blake3/<first 2 hex>/<64 hex>   one tensor's bytes, named by their BLAKE3 (the manifest's digest)
    tmp/<digest>.<pid>.<rand>.tmp   a store in progress; its writer holds an exclusive flock on it
    .lock                           nodes hold a shared flock while they run; clear-cache an exclusive one

Owns: entry paths, the atomic store (verify the bytes' BLAKE3 against the digest, write a temp file,
fsync, rename into place, fsync the directory: an entry is whole and right or absent, never partial),
size-checked lookup, full re-verification, quarantine of a bad entry, removing temp files of dead
writers, statistics, and emptying the cache under the exclusive lock (``clear_cache``).

A right-sized entry whose bytes went bad on disk is still returned by ``lookup``: the loader streams
it comparing each chunk's xxh3 with the manifest and calls ``quarantine`` on a mismatch, then fetches
from the source. Hashing every entry fully on every lookup would double the cost of a warm start.

Must not: store bytes it has not verified, delete anything under ``cache_dir`` that is not an entry or
one of its temp files (``--cache-dir /`` by mistake must not wipe a machine), read manifests or know
about models and sources (it shares only the manifest's definition of a tensor digest), or block on a
lock except where the caller asked to.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import blake3

from butterfly.weights.manifest import Buffer, fsync_dir, tensor_digest

__all__ = [
    "CacheBusy",
    "CacheError",
    "CacheLock",
    "CacheStats",
    "ClearResult",
    "WeightCache",
    "clear_cache",
    "lock_exclusive",
    "lock_shared",
]

ENTRIES_DIR = "blake3"
TMP_DIR = "tmp"
LOCK_FILE = ".lock"
_READ_CHUNK = 8 << 20

_DIGEST = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
_TMP_NAME = re.compile(r"[0-9a-f]{64}\.[0-9]+\.[0-9a-f]{8}\.tmp")
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW

log = logging.getLogger("butterfly.weights.cache")


class CacheError(Exception):
    """A cache operation failed: refused bytes, an unusable cache dir."""


class CacheBusy(CacheError):
    """The cache is locked by someone else (a running node, or a clear in progress)."""


def _check_digest(digest: str) -> str:
    # The digest becomes a path component: anything but 64 lowercase hex could escape the cache dir.
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a BLAKE3 hex digest: {digest!r}")
    return digest


# ---------------------------------------------------------------------------------------------------
# The cache-wide lock
# ---------------------------------------------------------------------------------------------------


class CacheLock:
    """A flock on ``cache_dir/.lock``, released by ``release()``, ``with`` or process exit."""

    def __init__(self, fd: int, path: Path, exclusive: bool) -> None:
        self._fd: int | None = fd
        self.path = path
        self.exclusive = exclusive

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> CacheLock:
        return self

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _lock(cache_dir: Path, mode: int, blocking: bool) -> CacheLock:
    path = Path(cache_dir) / LOCK_FILE
    # Read-only is enough for flock, so a lock file created by root (clear-cache) does not keep the
    # node's service user out.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | _OPEN_FLAGS, 0o644)
    try:
        fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise CacheBusy(f"{path} is locked by another process") from None
    except BaseException:
        os.close(fd)
        raise
    return CacheLock(fd, path, mode == fcntl.LOCK_EX)


def lock_shared(cache_dir: Path, *, blocking: bool = True) -> CacheLock:
    """What a running node holds: many nodes (or loaders) at once, never together with a clear."""
    return _lock(cache_dir, fcntl.LOCK_SH, blocking)


def lock_exclusive(cache_dir: Path, *, blocking: bool = False) -> CacheLock:
    """What ``clear_cache`` holds; raises ``CacheBusy`` while a node holds the shared lock."""
    return _lock(cache_dir, fcntl.LOCK_EX, blocking)


# ---------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int


@dataclass(frozen=True)
class ClearResult:
    """What ``clear_cache`` removed, and what it found but left alone."""

    removed: list[tuple[str, int]] = field(default_factory=list)
    tmp_files: int = 0
    tmp_bytes: int = 0
    left_alone: list[Path] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, size in self.removed) + self.tmp_bytes


def _is_regular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


class WeightCache:
    """The cache under ``cache_dir``. Safe to use from several threads and processes at once."""

    def __init__(self, cache_dir: Path, *, create: bool = True) -> None:
        """Open the cache; with ``create`` make its directories and remove dead writers' temp files."""
        self.root = Path(cache_dir)
        self.entries_dir = self.root / ENTRIES_DIR
        self.tmp_dir = self.root / TMP_DIR
        if not create:
            return
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise CacheError(f"cannot use cache dir {self.root}: {e.strerror or e}") from e
        removed = self.clean_tmp()
        if removed:
            log.info("removed %d temp files left in %s by writers that died", removed, self.tmp_dir)

    def path_of(self, digest: str) -> Path:
        d = _check_digest(digest)
        return self.entries_dir / d[:2] / d

    def lookup(self, digest: str, length: int) -> Path | None:
        """The entry's path if it is present and exactly ``length`` bytes; a wrong-sized one is removed."""
        path = self.path_of(digest)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not _is_regular(st):
            self.quarantine(digest, "not a regular file")
            return None
        if st.st_size != length:
            self.quarantine(digest, f"{st.st_size} bytes, the manifest says {length}")
            return None
        return path

    def open_for_read(self, digest: str) -> int:
        """A read-only descriptor on the entry; FileNotFoundError when absent, CacheError when it is not a
        regular file. The caller closes it.

        It stays valid if the entry is removed or replaced meanwhile: the bytes it reads are the ones
        of the file it opened.
        """
        # O_NONBLOCK: a FIFO planted at the path must not block the open; it is refused just below.
        fd = os.open(self.path_of(digest), os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS)
        if not _is_regular(os.fstat(fd)):
            os.close(fd)
            raise CacheError(f"cache entry {digest} is not a regular file")
        return fd

    def store_from_buffer(self, digest: str, data: Buffer) -> Path:
        """Store ``data`` as the entry ``digest`` after checking that BLAKE3(data) is ``digest``.

        Atomic: readers see no entry or the whole one. Storing a digest that is already present
        replaces it with the same (verified) bytes, which also repairs an entry gone bad on disk.
        ``data`` must not change during the call.
        """
        path = self.path_of(digest)
        got = tensor_digest(data).hex()
        if got != digest:
            raise CacheError(f"refusing to store {len(data)} bytes as {digest}: their BLAKE3 is {got}")
        fd, tmp = self._create_tmp(digest)
        try:
            view = memoryview(data).cast("B")
            written = 0
            while written < len(view):
                written += os.write(fd, view[written:])
            os.fsync(fd)
            shard = path.parent
            if not shard.is_dir():
                shard.mkdir(exist_ok=True)
                fsync_dir(self.entries_dir)
            os.replace(tmp, path)
            fsync_dir(shard)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        finally:
            os.close(fd)  # drops the flock that marked the temp file as ours
        return path

    def _create_tmp(self, digest: str) -> tuple[int, Path]:
        while True:
            tmp = self.tmp_dir / f"{digest}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Between open and flock a cleaner may have taken the file for a dead writer's and
            # unlinked it: then start over with a new name rather than write into a ghost.
            if os.fstat(fd).st_nlink > 0:
                return fd, tmp
            os.close(fd)

    def remove(self, digest: str) -> bool:
        """Remove the entry; False if it was not there. Open descriptors on it keep working."""
        path = self.path_of(digest)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def quarantine(self, digest: str, reason: str) -> None:
        """Remove a bad entry and log why; the caller fetches the tensor from the source again."""
        try:
            outcome = "removed" if self.remove(digest) else "was already gone"
        except OSError as e:  # e.g. a directory planted at the entry's path: report, do not crash
            outcome = f"could not be removed ({e.strerror or e})"
        log.warning(
            "cache entry %s %s: %s", digest, outcome, reason, extra={"fields": {"CACHE_DIGEST": digest}}
        )

    def verify(self, digest: str) -> bool:
        """True iff the entry exists and its full BLAKE3 is ``digest``."""
        try:
            fd = self.open_for_read(digest)
        except (FileNotFoundError, CacheError):
            return False
        try:
            size = os.fstat(fd).st_size
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            buf = memoryview(bytearray(min(_READ_CHUNK, max(size, 1))))
            while True:
                n = os.readv(fd, [buf])
                if n == 0:
                    break
                h.update(buf[:n])
        finally:
            os.close(fd)
        return bool(h.hexdigest() == digest)

    def entries(self) -> Iterator[tuple[str, int]]:
        """``(digest, size)`` of every entry, in no particular order."""
        for path, st in self._scan_entries()[0]:
            yield path.name, st.st_size

    def _scan_entries(self) -> tuple[list[tuple[Path, os.stat_result]], list[Path]]:
        found: list[tuple[Path, os.stat_result]] = []
        unknown: list[Path] = []
        try:
            shards = list(os.scandir(self.entries_dir))
        except FileNotFoundError:
            return found, unknown
        for shard in shards:
            if not (_SHARD.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)):
                unknown.append(Path(shard.path))
                continue
            for entry in os.scandir(shard.path):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                if _DIGEST.fullmatch(entry.name) and entry.name[:2] == shard.name and _is_regular(st):
                    found.append((Path(entry.path), st))
                else:
                    unknown.append(Path(entry.path))
        return found, unknown

    def stats(self) -> CacheStats:
        found, _ = self._scan_entries()
        return CacheStats(len(found), sum(st.st_size for _, st in found))

    def clean_tmp(self) -> int:
        """Remove temp files whose writer is gone (no flock held on them); return how many."""
        return self._clean_tmp()[0]

    def _clean_tmp(self) -> tuple[int, int]:
        count = size = 0
        try:
            names = os.listdir(self.tmp_dir)
        except FileNotFoundError:
            return 0, 0
        for name in names:
            if not _TMP_NAME.fullmatch(name):
                continue
            path = self.tmp_dir / name
            try:
                fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
            except OSError:
                continue  # renamed into place or removed meanwhile, or not ours to open
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer
                st = os.fstat(fd)
                # Unlink by name only if the name still points at the file we locked (a writer may
                # have renamed it into place after our open).
                try:
                    if os.stat(path, follow_symlinks=False).st_ino != st.st_ino:
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                count += 1
                size += st.st_size
            finally:
                os.close(fd)
        return count, size


def clear_cache(cache_dir: Path) -> ClearResult:
    """Empty the cache under its exclusive lock; ``CacheBusy`` while a node is using it.

    Removes entries and dead writers' temp files only; anything else found under ``blake3/`` is
    listed in ``left_alone`` and kept.
    """
    root = Path(cache_dir)
    if not root.is_dir():
        raise CacheError(f"cache dir {root} does not exist or is not a directory")
    if not any((root / name).exists() for name in (LOCK_FILE, ENTRIES_DIR, TMP_DIR)):
        # Never a cache (a mistyped --cache-dir?): leave it as it is, not even a lock file in it.
        if any(root.iterdir()):
            raise CacheError(
                f"{root} is not a weight cache (it has no {ENTRIES_DIR}/, {TMP_DIR}/ or {LOCK_FILE}): "
                "nothing removed"
            )
        return ClearResult()
    with lock_exclusive(root):
        cache = WeightCache(root, create=False)
        tmp_files, tmp_bytes = cache._clean_tmp()
        found, unknown = cache._scan_entries()
        removed: list[tuple[str, int]] = []
        for path, st in found:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append((path.name, st.st_size))
        shards = {path.parent for path, _ in found}
        for shard in shards:
            try:
                os.rmdir(shard)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
        if removed or shards:
            fsync_dir(cache.entries_dir)
        return ClearResult(removed, tmp_files, tmp_bytes, unknown)
