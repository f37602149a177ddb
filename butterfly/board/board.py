"""The node's status board: one shared-memory segment holding the sections of ``layout``.

This module owns creating and attaching a board (with the checks that make a wrong segment a clear
error), reading sections consistently through the seqlock and writing them. Each section has exactly
one writing process (see ``layout``); the board cannot enforce that across processes, so callers must
keep to it: two writers on one section corrupt it silently. A snapshot is consistent per section,
not across sections (there is no board-wide lock, by design: readers never block writers).

It must not decide what the values mean (the supervisor and the API do) and must not create or
remove segments other than its own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import cast

from butterfly.board import seqlock
from butterfly.board.errors import BoardAttachError, TornSectionError
from butterfly.board.layout import (
    BOARD_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    SECTION_TYPES,
    SEQ_SIZE,
    ClusterSection,
    EngineSection,
    HeaderSection,
    LoaderSection,
    NodeSection,
    S,
    Section,
    SectionLayout,
    ValidatorSection,
    layout_of,
)
from butterfly.board.shm import Segment, attach_segment, create_segment, unlink_segment

DEFAULT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class BoardSnapshot:
    """Every section, each read consistently on its own."""

    header: HeaderSection
    node: NodeSection
    cluster: ClusterSection
    loader: LoaderSection
    validator: ValidatorSection
    engine: EngineSection


class Board:
    """A mapped status board. Build with ``Board.create`` (supervisor) or ``Board.attach`` (others).

    Reads may come from any thread. Writes to one section must come from one thread of one process:
    the seqlock has no writer-writer exclusion, and ``update``'s local copy is not locked either."""

    def __init__(
        self,
        segment: Segment,
        impl: seqlock.SeqlockImpl | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._segment = segment
        self._impl = impl or seqlock.DEFAULT
        # How long a read waits for a consistent copy before calling the section torn.
        self.timeout_s = timeout_s
        # The writer's own last written copy of each section it writes: ``update`` starts from it
        # instead of re-reading shared memory, which only this process writes anyway.
        self._mine: dict[type[Section], Section] = {}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        node_id: str,
        *,
        supervisor_pid: int | None = None,
        impl: seqlock.SeqlockImpl | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Board:
        """Create segment ``name`` with default sections and the header. FileExistsError if taken."""
        segment = create_segment(name, BOARD_SIZE)
        board = cls(segment, impl, timeout_s)
        try:
            for section_cls in SECTION_TYPES:
                if section_cls is not HeaderSection:
                    board._write(section_cls())
            # The header (and its magic) goes last: a reader that sees the magic also sees sections
            # that are initialised, never a zero seq over a half-made board.
            header = HeaderSection(
                node_id=node_id,
                supervisor_pid=os.getpid() if supervisor_pid is None else supervisor_pid,
                created_unix=time.time(),
            )
            board._write(header)
        except BaseException:
            board.close()
            unlink_segment(name)
            raise
        board._mine.clear()  # defaults were the creator's doing, not a writer's last copy
        return board

    @classmethod
    def attach(
        cls,
        name: str,
        *,
        writable: bool = True,
        impl: seqlock.SeqlockImpl | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Board:
        """Map an existing board after checking it is one: magic, layout version and size.
        FileNotFoundError if there is no such segment; BoardAttachError if it is not a board."""
        try:
            segment = attach_segment(name, writable=writable)
        except ValueError as exc:  # a bad name, or an empty segment its creator never sized
            raise BoardAttachError(name, str(exc)) from exc
        try:
            board = cls(segment, impl, timeout_s)
            board._check_header()
        except BaseException:
            segment.close()
            raise
        return board

    def _check_header(self) -> None:
        seg = self._segment
        header_layout = layout_of(HeaderSection)
        minimum = SEQ_SIZE + header_layout.payload_size
        if seg.size < minimum:
            raise BoardAttachError(seg.name, f"segment is {seg.size} bytes, too short for a board header")
        # The magic is checked raw first so a foreign segment (whose "seq" may be odd) is reported
        # as foreign, not as a torn header after a timeout.
        magic = int.from_bytes(seg.buf[SEQ_SIZE : SEQ_SIZE + 4], "little")
        if magic != MAGIC:
            found = magic.to_bytes(4, "little")
            raise BoardAttachError(seg.name, f"bad magic {found!r} (expected b'BFLY'): not a status board")
        try:
            header = self.read(HeaderSection)
        except TornSectionError as exc:
            raise BoardAttachError(seg.name, f"header is torn: {exc}") from exc
        if header.layout_version != LAYOUT_VERSION:
            raise BoardAttachError(
                seg.name,
                f"layout version {header.layout_version}, this code reads version {LAYOUT_VERSION}",
            )
        if seg.size != BOARD_SIZE:
            raise BoardAttachError(
                seg.name, f"segment is {seg.size} bytes, layout version {LAYOUT_VERSION} needs {BOARD_SIZE}"
            )

    # -- access ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def path(self) -> str:
        return self._segment.path

    @property
    def implementation(self) -> seqlock.ImplName:
        return self._impl.name

    @property
    def closed(self) -> bool:
        return self._segment.closed

    def read(self, cls: type[S], timeout_s: float | None = None) -> S:
        """A consistent copy of section ``cls``; TornSectionError (naming it) if none in time."""
        layout = layout_of(cls)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            payload = self._impl.seq_read(self._segment.buf, layout.offset, layout.payload_size, timeout)
        except TornSectionError as exc:
            raise TornSectionError(exc.offset, exc.seq, exc.timeout_s, self._where(layout)) from None
        return cast(S, layout.decode(payload))

    def snapshot(self, timeout_s: float | None = None) -> BoardSnapshot:
        return BoardSnapshot(
            header=self.read(HeaderSection, timeout_s),
            node=self.read(NodeSection, timeout_s),
            cluster=self.read(ClusterSection, timeout_s),
            loader=self.read(LoaderSection, timeout_s),
            validator=self.read(ValidatorSection, timeout_s),
            engine=self.read(EngineSection, timeout_s),
        )

    def write(self, section: Section) -> None:
        """Publish ``section``; only its one writing process may call this for its type."""
        if isinstance(section, HeaderSection):
            raise ValueError("the header is written once, by Board.create")
        self._write(section)

    def update(self, cls: type[S], **changes: object) -> S:
        """Write this process's last copy of ``cls`` with ``changes`` applied and return it. The first
        call starts from the board's current value (a restarted child keeps its predecessor's)."""
        if cls is HeaderSection:
            raise ValueError("the header is written once, by Board.create")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
        current = self._mine.get(cls)
        if current is None:
            current = self.read_unwritten(cls)
        new = dataclasses.replace(cast(S, current), **changes)
        self._write(new)
        return new

    def read_unwritten(self, cls: type[S]) -> S:
        """Section ``cls`` while no process writes it: its writer has exited (the supervisor after a
        child's death) or is the caller (a restarted child before its first write)."""
        try:
            return self.read(cls)
        except TornSectionError:
            # The writer died mid-write (seq stuck odd). Nobody writes it now, so the bytes are
            # stable: take them as they are (a mix of its last two writes at worst); the next
            # writer's first write makes the section consistent again.
            layout = layout_of(cls)
            start = layout.offset + SEQ_SIZE
            return cast(S, layout.decode(bytes(self._segment.buf[start : start + layout.payload_size])))

    def _write(self, section: Section) -> None:
        layout = layout_of(type(section))
        if not self._segment.writable:
            raise ValueError(f"board {self.name!r} is attached read-only")
        payload = layout.encode(section)
        self._impl.seq_write(self._segment.buf, layout.offset, payload)
        self._mine[type(section)] = section

    def _where(self, layout: SectionLayout) -> str:
        return f"board {self.name!r} section {layout.key}"

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (idempotent). The segment stays for other processes until ``unlink``."""
        self._segment.close()

    def unlink(self) -> bool:
        """Remove the segment's name; False if already gone. Mappings stay valid until closed."""
        return unlink_segment(self._segment.name)

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Board {self.name!r} impl={self._impl.name}{' closed' if self.closed else ''}>"
