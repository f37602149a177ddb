"""Write-behind of freshly streamed tensors into the local cache: READY never waits for the cache.

A tensor read from the source lands in the arena checked chunk by chunk against the manifest; the
loader reports the load at once and hands the tensors here. One background thread, at a lower CPU
priority (nice 5 for that thread alone: below the validator and the engine, not so low that a busy
machine starves it), stores them one by one from the arena with
``WeightCache.store_from_buffer``, which re-hashes each with BLAKE3 against its manifest digest and
writes it atomically (temp file, fsync, rename): a crash mid-write leaves only a temp file, which the
next ``WeightCache`` removes, never an entry that could pass as complete.

A local filesystem source is read in place (the loader never reads the cache for it), but its
tensors are still cached here, after READY: the cache is a repair's first copy to try.

Must not: write the arena, keep a view of it after ``stop`` returns (the loader unmaps it next), or
raise into the loader (a tensor that cannot be cached is logged and skipped).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from butterfly.supervisor.childproc import held
from butterfly.weights.cache import CacheError, WeightCache

log = logging.getLogger("butterfly.loader")

# Test hook: while $BUTTERFLY_TEST_HOLD_DIR/hold-cache_write exists, nothing is written (READY must
# not wait for the cache).
HOLD_PHASE = "cache_write"
NICE = 5


@dataclass(frozen=True)
class Pending:
    """Tensor ``name``, whose BLAKE3 is ``digest``, lies at arena[offset:offset + length]."""

    name: str
    digest: str
    offset: int
    length: int


class WriteBehind:
    """Start with ``start()``; ``stop()`` cancels what is left and joins (idempotent)."""

    def __init__(self, cache: WeightCache, arena: Callable[[], memoryview], items: list[Pending]) -> None:
        self.cache = cache
        self.arena = arena
        self.items = items
        self.stored = 0
        self.failed = 0
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cache-write", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self) -> None:
        """Wait until every tensor was stored (or failed to be)."""
        if self._thread is not None:
            self._thread.join()

    def stop(self) -> None:
        """Cancel the tensors not yet begun and wait for the one being written (bounded by its size)."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # where nice cannot be set, write at normal priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while held(HOLD_PHASE) and not self._cancel.wait(0.05):
            pass
        buf = self.arena()
        try:
            for p in self.items:
                if self._cancel.is_set():
                    return
                try:
                    with buf[p.offset : p.offset + p.length] as view:
                        self.cache.store_from_buffer(p.digest, view)
                    self.stored += 1
                except (CacheError, OSError) as e:
                    self.failed += 1
                    log.warning("could not cache %s: %s", p.name, e)
            log.info("cached %d tensors behind the load (%d could not be)", self.stored, self.failed)
        finally:
            buf.release()
