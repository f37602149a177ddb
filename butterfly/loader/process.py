"""The loader child: fills the weight arena with exactly this node's tensors and gets them ready.

For an assignment (epoch, blocks [start, stop)) it
- download: reads each tensor's byte range from the source straight into the shared arena, in
  chunks, hashing every chunk with xxh3 as it lands;
- verify:   compares those chunk digests with the model manifest when one exists;
- upload / compile: on a GPU machine, host-to-device copies and kernel compile (weights issue);
  on the CPU path there is nothing to upload or compile, and the step says so;
- warmup:   one real forward pass of the stage on the loaded bytes.
Progress (bytes, rate, step) goes to the board's loader section; the result to the supervisor.
A new assignment or a shutdown arriving mid-load interrupts the current one between chunks.

This module owns the arena segment while the node runs; it must not talk to peers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import xxhash

from butterfly.board import LoaderSection
from butterfly.board.shm import Segment, create_segment, unlink_segment
from butterfly.hardware import detect_gpus
from butterfly.ipc import (
    ChunkDigest,
    Command,
    Failed,
    LoadAssignment,
    Loaded,
    Shutdown,
    SyncChannel,
    TensorPlacement,
)
from butterfly.loader.warmup import WarmupError, decode, run_stage
from butterfly.model.layout import LayerRange, ModelFormatError, ModelLayout, TensorEntry, load_layout
from butterfly.sources import FilesystemSource, SourceError
from butterfly.states import LoadStep
from butterfly.supervisor.childproc import (
    HEARTBEAT_S,
    ChildContext,
    CommandInbox,
    bootstrap,
    child_socket,
    hold_if_requested,
)

ARENA_ALIGN = 64
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


def place(tensors: list[TensorEntry]) -> tuple[list[TensorPlacement], int]:
    """Lay tensors out back to back in the arena, each aligned for vectorised reads."""
    out, off = [], 0
    for t in tensors:
        off = (off + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
        out.append(TensorPlacement(t.name, t.unit, off, t.length))
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

    def add(self, n: int, inbox: CommandInbox) -> None:
        self.done += n
        self.downloaded_total += n
        now = time.monotonic()
        if now - self.last_publish >= PUBLISH_EVERY_S or self.done == self.total:
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


class Loader:
    def __init__(self, ctx: ChildContext, chan: SyncChannel, inbox: CommandInbox) -> None:
        self.ctx = ctx
        self.chan = chan
        self.inbox = inbox
        self.arena: Segment | None = None
        self.downloaded_total = 0
        self.gpus = detect_gpus() if ctx.config.node.gpu != "off" else []

    def _beat(self) -> None:
        self.ctx.board.update(LoaderSection, heartbeat_mono_ns=time.monotonic_ns())

    def _step(self, step: LoadStep) -> float:
        now = time.monotonic_ns()
        self.ctx.board.update(LoaderSection, step=int(step), step_started_mono_ns=now, heartbeat_mono_ns=now)
        log.info("load step %s", step.label, extra={"fields": {"LOAD_STEP": step.label}})
        return time.monotonic()

    def _source(self) -> FilesystemSource:
        model = self.ctx.config.model
        if model.source_type != "filesystem":
            raise LoadFailed(f"model.source_type {model.source_type!r} is not supported by this build", True)
        return FilesystemSource(Path(model.source_path))

    def _drop_arena(self) -> None:
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        unlink_segment(self.ctx.init.arena_name)

    def load(self, cmd: LoadAssignment) -> Loaded:
        steps: dict[str, float] = {}
        source = self._source()
        try:
            layout = load_layout(source.model_dir())
            rng = LayerRange(cmd.start, cmd.stop)
            if cmd.stop > layout.num_blocks:
                raise LoadFailed(f"assignment {rng} is past the model's {layout.num_blocks} blocks", True)
            tensors = layout.tensors_for_blocks(rng)
            placements, arena_bytes = place(tensors)
            total = sum(t.length for t in tensors)
            self.ctx.board.update(
                LoaderSection,
                bytes_done=0,
                bytes_total=total,
                rate_bps=0.0,
                layer_start=cmd.start,
                layer_stop=cmd.stop,
            )
            self._drop_arena()
            self.arena = create_segment(self.ctx.init.arena_name, arena_bytes)

            t0 = self._step(LoadStep.DOWNLOAD)
            chunks = self._download(source, tensors, placements, total)
            steps["download"] = time.monotonic() - t0

            t0 = self._step(LoadStep.VERIFY)
            log.info("no manifest configured: chunk digests are recorded for validation, not compared")
            steps["verify"] = time.monotonic() - t0

            for step in (LoadStep.UPLOAD, LoadStep.COMPILE):
                t0 = self._step(step)
                if not self.gpus:
                    log.info("no GPU: %s skipped, weights stay in the host arena", step.label)
                steps[step.label] = time.monotonic() - t0

            t0 = self._step(LoadStep.WARMUP)
            self._warmup(layout, tensors, placements, rng)
            steps["warmup"] = time.monotonic() - t0
        except (ModelFormatError, ValueError) as e:
            raise LoadFailed(str(e), True) from e
        except SourceError as e:
            raise LoadFailed(str(e), False) from e
        finally:
            source.close()
        self.ctx.board.update(LoaderSection, step=int(LoadStep.NONE), heartbeat_mono_ns=time.monotonic_ns())
        return Loaded(
            epoch=cmd.epoch,
            start=cmd.start,
            stop=cmd.stop,
            arena_name=self.ctx.init.arena_name,
            arena_bytes=arena_bytes,
            tensors=placements,
            chunks=chunks,
            step_seconds=steps,
        )

    def _download(
        self,
        source: FilesystemSource,
        tensors: list[TensorEntry],
        placements: list[TensorPlacement],
        total: int,
    ) -> list[ChunkDigest]:
        assert self.arena is not None
        chunk = self.ctx.config.loader.chunk_bytes
        buf = memoryview(self.arena.buf)
        progress = Progress(self.ctx, total, downloaded_total=self.downloaded_total, started=time.monotonic())
        chunks: list[ChunkDigest] = []
        try:
            for i, (t, p) in enumerate(zip(tensors, placements, strict=True)):
                if i == len(tensors) // 2:
                    hold_if_requested("loading_weights", self._beat)
                for off in range(0, t.length, chunk):
                    n = min(chunk, t.length - off)
                    view = buf[p.arena_offset + off : p.arena_offset + off + n]
                    source.read_into(t.file, t.offset + off, view)
                    chunks.append(ChunkDigest(p.arena_offset + off, n, xxhash.xxh3_64_intdigest(view)))
                    progress.add(n, self.inbox)
        finally:
            self.downloaded_total = progress.downloaded_total
            del buf
        return chunks

    def _warmup(
        self,
        layout: ModelLayout,
        tensors: list[TensorEntry],
        placements: list[TensorPlacement],
        rng: LayerRange,
    ) -> None:
        assert self.arena is not None
        buf = memoryview(self.arena.buf)
        try:
            weights = {
                t.name: decode(buf[p.arena_offset : p.arena_offset + p.length], t.dtype, list(t.shape))
                for t, p in zip(tensors, placements, strict=True)
            }
            stats = run_stage(weights, layout.model_config, rng.start, rng.stop, layout.num_blocks)
        except WarmupError as e:
            raise LoadFailed(f"warmup of blocks {rng} failed: {e}", True) from e
        finally:
            weights = {}
            del buf
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
                break
            if isinstance(cmd, LoadAssignment):
                try:
                    self.chan.send(self.load(cmd))
                except Interrupted as i:
                    log.info("load of epoch %d interrupted by %s", cmd.epoch, i)
                    next_cmd = i.cmd
                except LoadFailed as e:
                    log.error("load of epoch %d failed: %s", cmd.epoch, e)
                    self.chan.send(Failed("load", str(e), fatal=e.fatal))
            else:
                log.warning("loader ignores %s", type(cmd).__name__)
        self._drop_arena()


def main() -> None:
    ctx, chan = bootstrap("loader", child_socket())

    ctx.board.update(LoaderSection, pid=os.getpid(), heartbeat_mono_ns=time.monotonic_ns())
    inbox = CommandInbox(chan)
    try:
        Loader(ctx, chan, inbox).serve()
    finally:
        ctx.board.close()
        ctx.logs.close()


if __name__ == "__main__":
    main()
