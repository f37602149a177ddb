"""The loader child: fills the weight arena with exactly this node's tensors and gets them ready.

For an assignment (epoch, blocks [start, stop)) it
- allocate: makes the arena and faults its pages in on every core, before the plan when it can
  (butterfly.loader.arena);
- download: reads each tensor's byte range from the source (or, for a remote source, the local
  cache) straight into the shared arena, in chunks, hashing every chunk with xxh3 as it lands;
- verify:   compares those chunk digests with the model manifest (required: no manifest, no load);
- upload / compile: on a GPU machine, host-to-device copies and kernel compile (weights issue);
  on the CPU path there is nothing to upload or compile, and the step says so;
- warmup:   one real forward pass of the inference engine (butterfly.engine) through the stage,
            over the arena's weights in place (loader/warmup.py).
Progress (bytes, rate, step) goes to the board's loader section; the result to the supervisor.
A new assignment or a shutdown arriving mid-load interrupts the current one between chunks.

This module owns the arena segment while the node runs; it must not talk to peers.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from butterfly.board import LoaderSection
from butterfly.board.shm import Segment, unlink_segment
from butterfly.hardware import SERVING_DEVICE, detect, meminfo
from butterfly.ipc import (
    ChunkDigest,
    Command,
    Failed,
    Landing,
    LoadAssignment,
    Loaded,
    Repaired,
    RepairTensors,
    Shutdown,
    SyncChannel,
    TensorPlacement,
    TensorsLanded,
    TensorSpec,
)
from butterfly.loader.arena import ARENA_ALIGN, ArenaError, EarlyArena, allocate
from butterfly.loader.prewarm import likely_arena_bytes

# The engine, and so torch: seconds to import (far more on a busy machine). Imported here, before the
# child's first heartbeat, where the supervisor allows a starting child CHILD_START_TIMEOUT_S; imported
# in a thread during a load instead, its GIL-holding stretches starved the loop of its heartbeats.
from butterfly.loader.warmup import WarmupError, warmup_stage
from butterfly.loader.writebehind import Pending, WriteBehind
from butterfly.states import LoadStep
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    CommandInbox,
    bootstrap,
    child_socket,
    held,
    hold_if_requested,
    run_beside,
)
from butterfly.weights.cache import WeightCache
from butterfly.weights.layout import (
    CONFIG_FILE,
    LayerRange,
    ModelFormatError,
    ModelLayout,
    TensorEntry,
)
from butterfly.weights.manifest import Manifest, ManifestError, layout_from_manifest
from butterfly.weights.modelsource import NoManifest, load_manifest
from butterfly.weights.provenance import ManifestRefused
from butterfly.weights.sources import FilesystemSource, Source, SourceError, open_source
from butterfly.weights.streamer import ChunkMismatch, ChunkResult, FdTable, ReadJob, open_files, stream_into

# Board progress writes are cheap, but not free: publish at most this often.
PUBLISH_EVERY_S = 0.05

log = logging.getLogger("butterfly.loader")


class Interrupted(Exception):
    def __init__(self, cmd: Command) -> None:
        super().__init__(type(cmd).__name__)
        self.cmd = cmd


class LoadFailed(Exception):
    def __init__(self, reason: str, fatal: bool) -> None:
        super().__init__(reason)
        self.fatal = fatal


def place(tensors: list[TensorEntry], manifest: Manifest | None = None) -> tuple[list[TensorPlacement], int]:
    """Lay tensors out back to back in the arena, each aligned for vectorised reads, with the digest
    the manifest gives each (what the validator compares the arena with)."""
    digests = {t.name: bytes.fromhex(t.blake3) for t in manifest.tensors} if manifest else {}
    out, off = [], 0
    for t in tensors:
        off = (off + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
        out.append(TensorPlacement(t.name, t.unit, off, t.length, digests.get(t.name, b"")))
        off += t.length
    return out, max(off, 1)


@dataclass
class Progress:
    board_ctx: ChildContext
    total: int
    done: int = 0
    downloaded_total: int = 0
    started: float = 0.0
    last_publish: float = 0.0

    def add(self, n: int, inbox: CommandInbox, downloaded: bool) -> None:
        self.done += n
        if downloaded:
            self.downloaded_total += n
        self.tick(inbox, force=self.done == self.total)

    def tick(self, inbox: CommandInbox, force: bool = False) -> None:
        """Publish progress and a heartbeat (at most every PUBLISH_EVERY_S), and look for a command that
        interrupts the load. Called as chunks land and between them, so a chunk that takes longer than
        the heartbeat timeout to trickle in from a slow source never silences the loader."""
        now = time.monotonic()
        if now - self.last_publish >= PUBLISH_EVERY_S or force:
            self.last_publish = now
            elapsed = max(now - self.started, 1e-9)
            self.board_ctx.board.update(
                LoaderSection,
                heartbeat_mono_ns=time.monotonic_ns(),
                bytes_done=self.done,
                bytes_downloaded_total=self.downloaded_total,
                rate_bps=self.done / elapsed,
            )
            cmd = inbox.pending()
            if cmd is not None:
                raise Interrupted(cmd)


HELD_FILE = "held"


@dataclass
class HeldBytes:
    """The previous load's arena, kept readable (``fd``) after its name went to the new arena: the
    tensors a new plan leaves on this node are copied from it (``offsets``: name -> where it lies)
    instead of read from the source again."""

    fd: int
    offsets: dict[str, int]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Fetch:
    """One load's download step: tensors the previous plan already had here from the old arena, cached
    tensors from the local cache, the rest from the source, every chunk compared inline with the
    manifest's xxh3 when there is one. A kept tensor or a cache entry whose bytes do not match is read
    from the source instead (a bad cache entry is quarantined); neither is ever trusted. A load reads
    the cache only for a remote source (a local one is read in place); a repair tries the cache first
    either way. What came from the source is written to the cache behind the load
    (butterfly.loader.writebehind), never before READY."""

    def __init__(
        self,
        loader: Loader,
        source: Source,
        manifest: Manifest | None,
        tensors: list[TensorEntry],
        placements: list[TensorPlacement],
        total: int,
        refetch: bool,
        repair: bool = False,
        held: HeldBytes | None = None,
        on_landed: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.loader = loader
        self.held = held
        self.source = source
        self.manifest = manifest
        self.records = {t.name: t for t in manifest.tensors} if manifest else {}
        self.jobs = {
            t.name: ReadJob(t.file, t.offset, t.length, p.arena_offset, t.name)
            for t, p in zip(tensors, placements, strict=True)
        }
        self.cache = WeightCache(loader.ctx.config.node.cache_dir) if manifest else None
        # A local filesystem source is read in place; the cache is read for a remote source, and for
        # a repair (it is written behind the load for both: the repair's first copy to try).
        self.read_cache = repair or not isinstance(source, FilesystemSource)
        self.refetch = refetch
        self.chunk_bytes = manifest.chunk_bytes if manifest else loader.ctx.config.loader.chunk_bytes
        self.progress = Progress(
            loader.ctx, total, downloaded_total=loader.downloaded_total, started=time.monotonic()
        )
        self.results: dict[str, list[ChunkResult]] = {}
        self.fetched: list[str] = []
        self.from_held = 0
        self.from_cache = 0
        self.from_source = 0
        # Tensors in the arena for good, told to ``on_landed`` by index (placement order) in batches:
        # the validator hashes them beside the stream (butterfly.validator.follow).
        self.on_landed = on_landed
        self.index = {n: i for i, n in enumerate(self.jobs)}
        self.missing = {n: j.length for n, j in self.jobs.items()}
        self.unsent: list[int] = []
        self.last_sent = 0.0

    def _expected(self, names: list[str]) -> list[list[int]] | None:
        if not self.records:
            return None
        return [list(self.records[n].chunks) for n in names]

    def _landed(self, names: list[str]) -> None:
        """``names`` are in the arena for good: queue them for ``on_landed``."""
        for n in names:
            if self.missing.pop(n, None) is not None:
                self.unsent.append(self.index[n])
        self._send_landed(force=not self.missing)

    def _chunk_landed(self, r: ChunkResult) -> None:
        """A chunk of the source pass landed intact (that pass writes each chunk once)."""
        n = r.chunk.tensor
        left = self.missing.get(n)
        if left is None:
            return
        if left > r.chunk.length:
            self.missing[n] = left - r.chunk.length
            self._send_landed()  # what an earlier tensor left unsent, once PUBLISH_EVERY_S has passed
        else:
            self._landed([n])

    def _send_landed(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.on_landed is not None and self.unsent and (force or now - self.last_sent >= PUBLISH_EVERY_S):
            self.on_landed(self.unsent)
            self.unsent = []
            self.last_sent = now

    def _stream(
        self, names: list[str], reader: FdTable | Source, downloaded: bool, live: bool = False
    ) -> None:
        """Stream ``names`` into the arena; ``live``: each tensor counts as landed as its last chunk lands
        (a pass nothing reads again on a mismatch), else the caller says when the pass's are for good."""
        if not names:
            return
        jobs = [self.jobs[n] for n in names]
        conc = self.loader.ctx.config.loader.concurrency

        def progress(n: int) -> None:
            self.progress.add(n, self.loader.inbox, downloaded)

        def tick() -> None:
            self.progress.tick(self.loader.inbox)

        if held("loading_weights") and len(names) > 1:
            # Test hook: stop half-way through this node's tensors until the hold file goes away. The
            # held load beats and heeds commands (a Shutdown, a new plan) as a slow read does.
            half = len(names) // 2
            self._stream(names[:half], reader, downloaded, live)
            self.progress.tick(self.loader.inbox, force=True)  # the held load shows how far it got
            hold_if_requested("loading_weights", tick)
            self._stream(names[half:], reader, downloaded, live)
            return

        assert self.loader.arena is not None
        # A view released on the way out, even when an error's traceback still names it: else the
        # arena could not be unmapped for the next load while that error is being handled.
        with self.loader.arena.view() as arena:
            results = stream_into(
                jobs,
                arena,
                reader,
                chunk_bytes=self.chunk_bytes,
                concurrency=conc,
                expected=self._expected(names),
                progress=progress,
                on_chunk=self._chunk_landed if live and self.on_landed is not None else None,
                tick=tick,
            )
        for r in results:
            self.results.setdefault(r.chunk.tensor, []).append(r)

    def _from_held(self, names: list[str]) -> list[str]:
        """Copies what the previous arena holds (checked chunk by chunk like any read); returns the
        names it could not serve."""
        held = self.held
        if held is None:
            return names
        hits = {n: (HELD_FILE, held.offsets[n]) for n in names if n in held.offsets}
        missing = [n for n in names if n not in hits]
        while hits:
            try:
                self._stream_elsewhere(hits, {HELD_FILE: held.fd})
                self.from_held += len(hits)
                break
            except ChunkMismatch as e:
                bad = e.chunk.tensor
                log.warning(
                    "%s as held in memory does not match the manifest (chunk %d): read from the source",
                    bad,
                    e.chunk.index,
                )
                del hits[bad]
                missing.append(bad)
        return missing

    def _from_cache(self, names: list[str]) -> list[str]:
        """Streams what the cache holds; returns the names it could not serve."""
        assert self.cache is not None
        hits = {}
        for n in names:
            rec = self.records[n]
            if self.refetch:
                self.cache.remove(rec.blake3)
            elif self.cache.lookup(rec.blake3, rec.length):
                hits[n] = rec.blake3
        missing = [n for n in names if n not in hits]
        while hits:
            fds: dict[str, int] = {}
            try:
                for digest in hits.values():
                    fds[f"cache/{digest}"] = self.cache.open_for_read(digest)
                self._stream_elsewhere({n: (f"cache/{d}", 0) for n, d in hits.items()}, fds)
                self.from_cache += len(hits)
                break
            except ChunkMismatch as e:
                bad = e.chunk.tensor
                self.cache.quarantine(
                    hits.pop(bad), f"chunk {e.chunk.index} of {bad} does not match the manifest"
                )
                missing.append(bad)
            finally:
                for fd in fds.values():
                    os.close(fd)
        return missing

    def _stream_elsewhere(self, where: dict[str, tuple[str, int]], fds: FdTable) -> None:
        """Streams tensors from other files than the source's into their arena ranges:
        ``where[name] = (file key in fds, offset there)``."""
        source_jobs = {n: self.jobs[n] for n in where}
        done_before = self.progress.done
        try:
            for n, (key, offset) in where.items():
                self.jobs[n] = ReadJob(key, offset, source_jobs[n].length, source_jobs[n].arena_offset, n)
            self._stream(list(where), fds, downloaded=False)
            self._landed(list(where))
        except ChunkMismatch:
            # Everything of this pass is read again (rare: a corrupt copy).
            for n in where:
                self.results.pop(n, None)
            self.progress.done = done_before
            raise
        finally:
            self.jobs.update(source_jobs)

    def run(self) -> list[ChunkDigest]:
        try:
            return self._run()
        finally:
            # Also when interrupted or failed: the bytes read so far were read, and the next load
            # counts on from them (a counter never goes back).
            self.loader.downloaded_total = self.progress.downloaded_total

    def _run(self) -> list[ChunkDigest]:
        self._landed([n for n, left in self.missing.items() if left == 0])  # empty tensors
        names = self._from_held(list(self.jobs))
        if self.cache is not None and self.read_cache:
            names = self._from_cache(names)
        if names:
            if isinstance(self.source, FilesystemSource):
                with open_files(self.source.root, {self.jobs[n].file for n in names}) as fds:
                    self._stream(names, fds, downloaded=True, live=True)
            else:
                self._stream(names, self.source, downloaded=True, live=True)
            self._landed(names)
            self.fetched = names
            self.from_source = len(names)
        return [
            ChunkDigest(r.chunk.arena_offset, r.chunk.length, r.xxh3)
            for n in self.jobs
            for r in sorted(self.results[n], key=lambda r: r.chunk.index)
        ]

    def write_behind(self) -> WriteBehind | None:
        """Store what came from the remote source (already checked chunk by chunk) into the cache on a
        background thread; the load is reported without waiting for it."""
        if self.cache is None or not self.fetched:
            return None
        seg = self.loader.arena
        assert seg is not None
        items = [
            Pending(n, self.records[n].blake3, self.jobs[n].arena_offset, self.jobs[n].length)
            for n in self.fetched
        ]
        writer = WriteBehind(self.cache, lambda: memoryview(seg.buf), items)
        writer.start()
        return writer


class Loader:
    def __init__(self, ctx: ChildContext, chan: SyncChannel, inbox: CommandInbox) -> None:
        self.ctx = ctx
        self.chan = chan
        self.inbox = inbox
        self.arena: Segment | None = None
        self.manifest: Manifest | None = None
        self.gpu_result: object | None = None
        # What the arena holds since the last load: (epoch, its tensors, their placements).
        self.held: tuple[int, list[TensorEntry], list[TensorPlacement]] | None = None
        # Bytes read from the model source since the node started: the supervisor hands a restarted
        # loader its predecessors' count, published as bytes_downloaded_total (a counter).
        self.downloaded_total = ctx.init.downloaded_bytes
        self.writers: list[WriteBehind] = []
        self.early: EarlyArena | None = None
        self.gpus = detect(ctx.config.node.gpu).gpus

    def _beat(self) -> None:
        self.ctx.board.update(LoaderSection, heartbeat_mono_ns=time.monotonic_ns())

    def _step(self, step: LoadStep) -> float:
        now = time.monotonic_ns()
        self.ctx.board.update(LoaderSection, step=int(step), step_started_mono_ns=now, heartbeat_mono_ns=now)
        log.info("load step %s", step.label, extra={"fields": {"LOAD_STEP": step.label}})
        return time.monotonic()

    def _manifest(self) -> Manifest:
        """The model's manifest, read once per process and checked as the cluster child checks it (pins
        included). No manifest, no load: every chunk is verified against it as it lands, and the
        validator compares every tensor with its digest."""
        if self.manifest is None:
            try:
                self.manifest = load_manifest(self.ctx.config)
            except (NoManifest, ManifestError, ManifestRefused) as e:
                raise LoadFailed(f"cannot use the model's manifest: {e}", True) from e
            except SourceError as e:
                raise LoadFailed(f"cannot read the model's manifest: {e}", False) from e
        return self.manifest

    def start_early_arena(self) -> None:
        """Make the arena while the cluster forms (the plan comes later): its faults are most of the
        allocation's cost, and they need only its size. The first loader of a node adopts the arena the
        supervisor began (butterfly.loader.prewarm); any later one starts afresh."""
        adopt = self.ctx.init.arena_prewarmed
        if not adopt:
            unlink_segment(self.ctx.init.arena_name)  # a dead predecessor's; readers keep their mappings
        self.early = EarlyArena(
            self.ctx.init.arena_name,
            lambda: likely_arena_bytes(self.ctx.config, self._manifest()),
            adopt=adopt,
        )

    def _new_arena(self, size: int) -> Segment:
        early, self.early = self.early, None
        if early is not None:
            seg = early.take(size, self._beat)
            if seg is not None:
                return seg
        self._drop_arena()
        return allocate(self.ctx.init.arena_name, size, self._beat)

    def _layout(self, source: Source) -> tuple[Manifest, ModelLayout]:
        manifest = self._manifest()
        return manifest, layout_from_manifest(manifest, source.description)

    def _write_behind(self, fetch: Fetch) -> None:
        writer = fetch.write_behind()
        if writer is not None:
            self.writers.append(writer)

    def _drop_arena(self) -> None:
        for writer in self.writers:
            writer.stop()  # it reads the arena
        self.writers.clear()
        if self.arena is not None:
            try:
                self.arena.close()
            except BufferError:
                # Tensor views of the old arena (a failed warmup's stage, kept by an exception's
                # frames in a reference cycle) may hold the mapping: they are garbage, collect them.
                gc.collect()
                try:
                    self.arena.close()
                except BufferError:
                    # Still referred to (an error's traceback being handled): the mapping goes with
                    # the view; the name goes now, so the next arena can be made.
                    log.warning("the previous arena still had views; it is unmapped when they are gone")
            self.arena = None
        unlink_segment(self.ctx.init.arena_name)

    def _keep_held(self, tensors: list[TensorEntry], arena_bytes: int) -> HeldBytes | None:
        """The tensors of ``tensors`` that the current arena already holds, kept readable for the next
        load to copy (a survivor of a re-plan loads only what it gains). Only where the machine has
        the memory for both arenas at once beside the reserve; on a GPU node the host arena is not
        the weights' home, so nothing is kept."""
        if self.arena is None or self.held is None or self.gpus:
            return None
        _, old_tensors, old_placements = self.held
        old = {t.name: (t, p) for t, p in zip(old_tensors, old_placements, strict=True)}
        offsets = {
            t.name: old[t.name][1].arena_offset
            for t in tensors
            if t.name in old and old[t.name][0].length == t.length
        }
        if not offsets:
            return None
        free = meminfo("MemAvailable")
        if free is None or free < arena_bytes + self.ctx.config.node.memory_reserve_bytes:
            log.info(
                "not enough memory to hold the previous range beside the new one (%s available, %d "
                "needed beside the reserve): reading every tensor again",
                "unknown" if free is None else f"{free}",
                arena_bytes,
            )
            return None
        try:
            fd = os.open(self.arena.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("cannot keep the previous arena readable (%s): reading every tensor again", e)
            return None
        return HeldBytes(fd, offsets)

    def _source(self) -> Source:
        try:
            return run_beside(lambda: open_source(self.ctx.config), self._beat)
        except (SourceError, ValueError) as e:
            raise LoadFailed(f"cannot open the model source: {e}", False) from e

    def load(self, cmd: LoadAssignment) -> Loaded:
        steps: dict[str, float] = {}
        source = self._source()
        try:
            if self.early is not None:
                self.early.wait(self._beat)  # it reads the manifest too
            # The manifest and the layout come from the source: from S3, a slow read of its own.
            manifest, layout = run_beside(lambda: self._layout(source), self._beat)
            rng = LayerRange(cmd.start, cmd.stop)
            if cmd.stop > layout.num_blocks:
                raise LoadFailed(f"assignment {rng} is past the model's {layout.num_blocks} blocks", True)
            tensors = layout.tensors_for_blocks(rng)
            placements, arena_bytes = place(tensors, manifest)
            total = sum(t.length for t in tensors)
            self.ctx.board.update(
                LoaderSection,
                bytes_done=0,
                bytes_total=total,
                rate_bps=0.0,
                layer_start=cmd.start,
                layer_stop=cmd.stop,
            )
            kept = None if cmd.refetch else self._keep_held(tensors, arena_bytes)
            self.held = None
            try:
                # Pre-faulted: first-touch page faults during the stream cost several times the copy.
                t0 = time.monotonic()
                self.arena = self._new_arena(arena_bytes)
                steps["allocate"] = time.monotonic() - t0

                t0 = self._step(LoadStep.DOWNLOAD)
                # The validator hashes each tensor beside the stream as it lands (validator/follow.py).
                epoch = cmd.epoch
                self.chan.send(Landing(epoch, self.ctx.init.arena_name, placements))
                fetch = Fetch(
                    self,
                    source,
                    manifest,
                    tensors,
                    placements,
                    total,
                    refetch=cmd.refetch,
                    held=kept,
                    on_landed=lambda idx: self.chan.send(TensorsLanded(epoch, idx)),
                )
                chunks = fetch.run()
                steps["download"] = time.monotonic() - t0
            finally:
                if kept is not None:
                    kept.close()

            t0 = self._step(LoadStep.VERIFY)
            log.info(
                "%d chunks matched model version %s inline; tensors: %d kept in memory from the previous "
                "range, %d from cache, %d from %s",
                len(chunks),
                manifest.merkle_root[:16],
                fetch.from_held,
                fetch.from_cache,
                fetch.from_source,
                source.description,
            )
            steps["verify"] = time.monotonic() - t0

            if self.gpus:
                self._gpu_steps(layout, tensors, placements, rng, steps)
            else:
                for step in (LoadStep.UPLOAD, LoadStep.COMPILE):
                    t0 = self._step(step)
                    log.info("no GPU: %s skipped, weights stay in the host arena", step.label)
                    steps[step.label] = time.monotonic() - t0
                t0 = self._step(LoadStep.WARMUP)
                self._warmup(layout, tensors, placements, rng)
                steps["warmup"] = time.monotonic() - t0
        except (ModelFormatError, ValueError) as e:
            raise LoadFailed(str(e), True) from e
        except (SourceError, ChunkMismatch, ArenaError) as e:
            raise LoadFailed(str(e), False) from e
        finally:
            source.close()
        self.ctx.board.update(LoaderSection, step=int(LoadStep.NONE), heartbeat_mono_ns=time.monotonic_ns())
        self.held = (cmd.epoch, tensors, placements)
        self._write_behind(fetch)
        return Loaded(
            epoch=cmd.epoch,
            start=cmd.start,
            stop=cmd.stop,
            arena_name=self.ctx.init.arena_name,
            arena_bytes=arena_bytes,
            tensors=placements,
            chunks=chunks,
            step_seconds=steps,
            specs=[TensorSpec(t.name, t.dtype, list(t.shape)) for t in tensors],
            model_config=json.dumps(layout.model_config),
            model_config_where=f"{layout.root}/{CONFIG_FILE}",
        )

    def repair(self, cmd: RepairTensors) -> Repaired:
        """Read ``cmd.tensors`` of the held assignment again into their places in the arena: from the
        cache when it has them, else the source, every chunk checked against the manifest as it lands
        (a cache entry that fails is quarantined and the source read instead)."""
        if self.held is None or self.held[0] != cmd.epoch:
            raise LoadFailed(f"nothing of epoch {cmd.epoch} is loaded to repair", False)
        if self.gpus:
            # Hook for issue 13: the GPU copy would need the repaired tensors uploaded again. Until
            # then a failed repair makes the supervisor reload the whole assignment.
            raise LoadFailed("repairing the weights on a GPU node is not supported yet: reloading", False)
        hold_if_requested("repair", self._beat)  # test hook: a node caught not serving, mid-repair
        _, tensors, placements = self.held
        names = set(cmd.tensors)
        picked = [(t, p) for t, p in zip(tensors, placements, strict=True) if t.name in names]
        if len(picked) != len(names):
            raise LoadFailed(
                f"cannot repair tensors not loaded here: {sorted(names - {t.name for t, _ in picked})}", False
            )
        # The cache is the repair's first copy to try: let the write-behind of the load finish first.
        for writer in self.writers:
            writer.wait()
        held_bytes = sum(t.length for t in tensors)
        size = sum(t.length for t, _ in picked)
        source = self._source()
        try:
            manifest = self._manifest()
            fetch = Fetch(
                self,
                source,
                manifest,
                [t for t, _ in picked],
                [p for _, p in picked],
                held_bytes,
                False,
                repair=True,
            )
            # Progress reads as the whole held range, of which only these bytes are missing.
            fetch.progress.done = held_bytes - size
            fetch.run()
            self._write_behind(fetch)
        except (SourceError, ChunkMismatch) as e:
            raise LoadFailed(f"repair of {', '.join(sorted(names))} failed: {e}", False) from e
        finally:
            source.close()
        log.info(
            "repaired %s (%d bytes): %d tensor(s) from the cache, %d from %s",
            ", ".join(sorted(names)),
            size,
            fetch.from_cache,
            fetch.from_source,
            source.description,
        )
        return Repaired(cmd.epoch, sorted(names), fetch.from_cache, fetch.from_source)

    def _gpu_steps(
        self,
        layout: ModelLayout,
        tensors: list[TensorEntry],
        placements: list[TensorPlacement],
        rng: LayerRange,
        steps: dict[str, float],
    ) -> None:
        """Upload with a device-side checksum compared to the host's, compile, then the engine's
        warmup on the serving device over the device copies."""
        from butterfly.loader import gpu

        try:
            t0 = self._step(LoadStep.UPLOAD)
            self.gpu_result = None  # free the previous assignment's device memory first
            arena = self.arena
            assert arena is not None

            def upload() -> gpu.GpuUploadResult:
                with arena.view() as buf:
                    return gpu.upload_and_verify(buf, placements, device=SERVING_DEVICE)

            result = run_beside(upload, self._beat)
            self.gpu_result = result
            steps["upload"] = time.monotonic() - t0
            t0 = self._step(LoadStep.COMPILE)
            run_beside(lambda: gpu.compile_kernels(SERVING_DEVICE), self._beat)
            steps["compile"] = time.monotonic() - t0
            t0 = self._step(LoadStep.WARMUP)
            where = f"{layout.root}/{CONFIG_FILE}"
            blocks, n = (rng.start, rng.stop), layout.num_blocks
            stats = run_beside(
                lambda: gpu.gpu_warmup(result, tensors, layout.model_config, where, blocks, n), self._beat
            )
            steps["warmup"] = time.monotonic() - t0
            log.info("GPU warmup of blocks %s ok: %s", rng, stats)
        except WarmupError as e:
            raise LoadFailed(f"warmup of blocks {rng} on GPU {SERVING_DEVICE} failed: {e}", True) from e
        except gpu.GpuVerifyError as e:
            raise LoadFailed(f"GPU copy of the weights does not match the arena: {e}", False) from e
        except Exception as e:  # CUDA errors surface as many types; all mean this load failed
            raise LoadFailed(f"GPU upload failed: {type(e).__name__}: {e}", False) from e

    def _warmup(
        self,
        layout: ModelLayout,
        tensors: list[TensorEntry],
        placements: list[TensorPlacement],
        rng: LayerRange,
    ) -> None:
        """A forward pass of the inference engine over the arena's weights, in place."""
        assert self.arena is not None
        where = f"{layout.root}/{CONFIG_FILE}"
        failed = ""
        try:
            stats = warmup_stage(
                self.arena.buf,
                placements,
                tensors,
                layout.model_config,
                where,
                (rng.start, rng.stop),
                layout.num_blocks,
                beat=self._beat,
            )
        except WarmupError as e:
            failed = str(e)
        # Raised outside the except block: no traceback keeps the stage's views of the arena alive.
        if failed:
            raise LoadFailed(f"warmup of blocks {rng} failed: {failed}", True)
        log.info("warmup of blocks %s ok: %s", rng, stats)

    def serve(self) -> None:
        next_cmd: Command | None = None
        while True:
            cmd = next_cmd or self.inbox.get(timeout=HEARTBEAT_S)
            next_cmd = None
            self.ctx.board.update(LoaderSection, heartbeat_mono_ns=time.monotonic_ns())
            if cmd is None:
                continue
            if isinstance(cmd, Shutdown):
                if self.early is not None:
                    self.early.discard(self._beat)
                break
            if isinstance(cmd, LoadAssignment | RepairTensors):
                what = "load" if isinstance(cmd, LoadAssignment) else "repair"
                try:
                    self.chan.send(self.load(cmd) if isinstance(cmd, LoadAssignment) else self.repair(cmd))
                except Interrupted as i:
                    log.info("%s of epoch %d interrupted by %s", what, cmd.epoch, i)
                    next_cmd = i.cmd
                except LoadFailed as e:
                    log.error("%s of epoch %d failed: %s", what, cmd.epoch, e)
                    self.chan.send(Failed(what, str(e), fatal=e.fatal))
            else:
                log.warning("loader ignores %s", type(cmd).__name__)
        self._drop_arena()


def main() -> None:
    ctx, chan = bootstrap("loader", child_socket())

    # No heartbeat yet: the supervisor gives a child until its serve loop's first beat to start.
    ctx.board.update(LoaderSection, pid=os.getpid())
    inbox = CommandInbox(chan)
    try:
        loader = Loader(ctx, chan, inbox)
        loader.start_early_arena()
        loader.serve()
    finally:
        ctx.board.close()
        ctx.logs.close()


if __name__ == "__main__":
    main()
