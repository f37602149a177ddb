"""The status board's byte layout: its sections, their fields, and how each is packed.

Each section is a frozen dataclass whose annotations are its declaration: the type alias of a field
(``U64``, ``Str64``...) carries its on-board encoding, so adding a field is one line here plus a
``LAYOUT_VERSION`` bump. On the board a section is a seqlock counter (u64) followed by its packed
little-endian payload, padded to 64 bytes so that two writers never share a cache line.

This module owns the layout and the pure encode/decode of payloads. It must not touch shared memory
or the seqlock (``board`` does), and must not depend on which process writes which section beyond
documenting it.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import typing
from dataclasses import dataclass
from typing import Annotated, ClassVar, TypeVar

LAYOUT_VERSION = 6
# b"BFLY" as the first payload bytes of the header, read as a little-endian u32.
MAGIC = int.from_bytes(b"BFLY", "little")
SECTION_ALIGN = 64
SEQ_SIZE = 8
PHASE_SLOTS = 8


@dataclass(frozen=True)
class Int:
    """An integer field; ``code`` is its struct code (B, I, i, Q)."""

    code: str


@dataclass(frozen=True)
class Float:
    """A float64 field."""


@dataclass(frozen=True)
class Text:
    """A string of at most ``size`` UTF-8 bytes, NUL padded, truncated on a character boundary."""

    size: int


@dataclass(frozen=True)
class Floats:
    """A fixed-length tuple of float64."""

    count: int


FieldKind = Int | Float | Text | Floats

U8 = Annotated[int, Int("B")]
U32 = Annotated[int, Int("I")]
I32 = Annotated[int, Int("i")]
U64 = Annotated[int, Int("Q")]
F64 = Annotated[float, Float()]
Str32 = Annotated[str, Text(32)]
Str64 = Annotated[str, Text(64)]
PhaseDurations = Annotated[tuple[float, ...], Floats(PHASE_SLOTS)]

_NOT_DONE = (-1.0,) * PHASE_SLOTS


@dataclass(frozen=True)
class Section:
    """Base of all sections. ``KEY`` names the section in snapshots and errors."""

    KEY: ClassVar[str] = ""


@dataclass(frozen=True)
class HeaderSection(Section):
    """Written once by the board's creator (the supervisor) before any other process attaches."""

    KEY: ClassVar[str] = "header"
    magic: U32 = MAGIC
    layout_version: U32 = LAYOUT_VERSION
    node_id: Str64 = ""
    supervisor_pid: U32 = 0
    created_unix: F64 = 0.0


@dataclass(frozen=True)
class NodeSection(Section):
    """Writer: the supervisor. ``phase_durations[p]`` is seconds spent in phase p, -1.0 until done.
    ``serving_epoch``: the epoch this node validated and was told is operational (0: none);
    ``heartbeat_mono_ns``: the supervisor's own beat (butterfly.gate reads both).

    Reasons (why the node failed or waits) are not here: a fixed-size field would cut them. The
    supervisor keeps them whole (``butterfly.status.Notes``) and every reader gets them from it."""

    KEY: ClassVar[str] = "node"
    state: U8 = 0
    phase: U8 = 0
    load_step: U8 = 0
    watchdog_ok: U8 = 0
    started_mono_ns: U64 = 0
    phase_started_mono_ns: U64 = 0
    phase_durations: PhaseDurations = _NOT_DONE
    error_source: Str32 = ""
    child_restarts: U32 = 0
    serving_epoch: U64 = 0
    heartbeat_mono_ns: U64 = 0
    repairs: U32 = 0


@dataclass(frozen=True)
class ClusterSection(Section):
    """Writer: the cluster child. ``lease_until_mono_ns``: this node may serve plan ``lease_epoch``
    until then (monotonic clock), as its coordinator granted it (butterfly.cluster.lease); 0: no lease.
    ``membership``: this node in the Raft configuration (``MEMBERSHIP``: 0 none yet, 1 voter, 2 learner)."""

    KEY: ClassVar[str] = "cluster"
    heartbeat_mono_ns: U64 = 0
    pid: U32 = 0
    cluster_size: U32 = 0
    operational_nodes: U32 = 0
    quorum_size: U32 = 0
    term: U64 = 0
    epoch: U64 = 0
    coordinator: Str64 = ""
    is_coordinator: U8 = 0
    model_root: Str64 = ""
    lease_until_mono_ns: U64 = 0
    lease_epoch: U64 = 0
    membership: U8 = 0


@dataclass(frozen=True)
class LoaderSection(Section):
    """Writer: the loader child. ``rate_bps`` is bytes per second; layers are [start, stop)."""

    KEY: ClassVar[str] = "loader"
    heartbeat_mono_ns: U64 = 0
    pid: U32 = 0
    step: U8 = 0
    bytes_done: U64 = 0
    bytes_total: U64 = 0
    bytes_downloaded_total: U64 = 0
    rate_bps: F64 = 0.0
    step_started_mono_ns: U64 = 0
    layer_start: I32 = 0
    layer_stop: I32 = 0
    cache_hits: U64 = 0


@dataclass(frozen=True)
class ValidatorSection(Section):
    """Writer: the validator child. ``fault`` is 1 from a mismatch found in memory (validation or
    scrubbing) until a validation passes again: while it is set the node must not serve."""

    KEY: ClassVar[str] = "validator"
    heartbeat_mono_ns: U64 = 0
    pid: U32 = 0
    bytes_hashed: U64 = 0
    bytes_total: U64 = 0
    leaves_root: Str64 = ""
    mismatches: U32 = 0
    fault: U8 = 0
    scrubbing: U8 = 0
    scrub_bytes: U64 = 0
    scrub_passes: U64 = 0
    scrub_cpu_s: F64 = 0.0
    scrub_last_pass_s: F64 = 0.0


@dataclass(frozen=True)
class EngineSection(Section):
    """Writer: the engine child (``butterfly.serving.process``). ``serving``: its stage is built and
    part of the pipeline of ``epoch``; ``running``/``waiting``: sequences at the entry stage."""

    KEY: ClassVar[str] = "engine"
    heartbeat_mono_ns: U64 = 0
    pid: U32 = 0
    epoch: U64 = 0
    serving: U8 = 0
    running: U32 = 0
    waiting: U32 = 0
    kv_bytes_in_use: U64 = 0
    kv_bytes_total: U64 = 0


MEMBERSHIP = ("none", "voter", "learner")

# Board order. Appending a section (or a field) changes offsets: bump LAYOUT_VERSION.
SECTION_TYPES: tuple[type[Section], ...] = (
    HeaderSection,
    NodeSection,
    ClusterSection,
    LoaderSection,
    ValidatorSection,
    EngineSection,
)

S = TypeVar("S", bound=Section)


def truncate_utf8(text: str, size: int) -> bytes:
    """``text`` as at most ``size`` UTF-8 bytes, cut before any character that would not fit whole.
    Unencodable code points (lone surrogates from odd file names) become '?' rather than fail."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= size:
        return raw
    cut = size
    # Step back over continuation bytes (10xxxxxx) to the start of the character that was split.
    while cut > 0 and (raw[cut] & 0xC0) == 0x80:
        cut -= 1
    return raw[:cut]


@dataclass(frozen=True)
class FieldSpec:
    """One field of a section: where its bytes sit in the payload and how they are packed."""

    name: str
    kind: FieldKind
    fmt: str  # struct format of this field alone (little-endian, no padding)
    offset: int  # within the payload
    size: int

    @property
    def slots(self) -> int:
        """How many struct values the field takes."""
        return self.kind.count if isinstance(self.kind, Floats) else 1

    def to_struct(self, value: object) -> tuple[object, ...]:
        kind = self.kind
        if isinstance(kind, Text):
            if not isinstance(value, str):
                raise TypeError(f"field {self.name} must be str, not {type(value).__name__}")
            return (truncate_utf8(value, kind.size),)
        if isinstance(kind, Floats):
            if not isinstance(value, tuple | list) or len(value) != kind.count:
                raise ValueError(f"field {self.name} must be a tuple of {kind.count} floats, not {value!r}")
            return tuple(value)
        return (value,)

    def encode(self, value: object) -> bytes:
        """This field's bytes alone (used to write one field, e.g. to provoke a torn read)."""
        try:
            return struct.pack(self.fmt, *self.to_struct(value))
        except struct.error as exc:
            raise ValueError(f"field {self.name}: {value!r} does not fit {self.fmt!r} ({exc})") from exc


def _field_kind(cls: type[Section], name: str, hint: object) -> FieldKind:
    for meta in getattr(hint, "__metadata__", ()):
        if isinstance(meta, Int | Float | Text | Floats):
            return meta
    raise TypeError(f"{cls.__name__}.{name} has no board encoding; annotate it with U8, U64, Str64...")


def _kind_fmt(kind: FieldKind) -> str:
    if isinstance(kind, Int):
        return kind.code
    if isinstance(kind, Float):
        return "d"
    if isinstance(kind, Text):
        return f"{kind.size}s"
    return f"{kind.count}d"


@dataclass(frozen=True)
class SectionLayout:
    """Where a section lives on the board and its codec. ``offset`` is that of its seq counter."""

    cls: type[Section]
    key: str
    offset: int
    fields: tuple[FieldSpec, ...]
    codec: struct.Struct

    @property
    def payload_size(self) -> int:
        return self.codec.size

    @property
    def size(self) -> int:
        """Counter + payload, padded to the section alignment."""
        return _align(SEQ_SIZE + self.codec.size, SECTION_ALIGN)

    def encode(self, section: Section) -> bytes:
        if type(section) is not self.cls:
            raise TypeError(f"expected a {self.cls.__name__}, got {type(section).__name__}")
        values: list[object] = []
        for spec in self.fields:
            values.extend(spec.to_struct(getattr(section, spec.name)))
        try:
            return self.codec.pack(*values)
        except struct.error:
            # Find the offending field so the message names it (the joint pack cannot).
            for spec in self.fields:
                spec.encode(getattr(section, spec.name))
            raise

    @functools.cached_property
    def _decode_plan(self) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """Positions in the unpacked values of text fields, and (start, count) runs of float arrays
        (last first, so collapsing one keeps the earlier positions valid)."""
        texts: list[int] = []
        runs: list[tuple[int, int]] = []
        i = 0
        for spec in self.fields:
            if isinstance(spec.kind, Text):
                texts.append(i)
            elif isinstance(spec.kind, Floats):
                runs.append((i, spec.kind.count))
            i += spec.slots
        return tuple(texts), tuple(reversed(runs))

    def decode(self, payload: bytes) -> Section:
        # Positional and plan-driven: readers (the HTTP API, the supervisor's loops) decode every
        # section on each snapshot, and a per-field dispatch cost three times the unpack itself.
        values = list(self.codec.unpack(payload))
        texts, runs = self._decode_plan
        for i in texts:
            # "replace": a reader (the HTTP API) must never fail on a corrupt or foreign board.
            values[i] = values[i].rstrip(b"\0").decode("utf-8", "replace")
        for start, count in runs:
            values[start : start + count] = [tuple(values[start : start + count])]
        return self.cls(*values)


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _build_layout(cls: type[Section], offset: int) -> SectionLayout:
    hints = typing.get_type_hints(cls, include_extras=True)
    specs: list[FieldSpec] = []
    pos = 0
    for f in dataclasses.fields(cls):
        kind = _field_kind(cls, f.name, hints[f.name])
        fmt = "<" + _kind_fmt(kind)
        size = struct.calcsize(fmt)
        specs.append(FieldSpec(f.name, kind, fmt, pos, size))
        pos += size
    codec = struct.Struct("<" + "".join(_kind_fmt(s.kind) for s in specs))
    assert codec.size == pos, "'<' packs without padding, so field sizes add up"
    return SectionLayout(cls, cls.KEY, offset, tuple(specs), codec)


def _build_all() -> tuple[dict[type[Section], SectionLayout], int]:
    layouts: dict[type[Section], SectionLayout] = {}
    offset = 0
    for cls in SECTION_TYPES:
        layout = _build_layout(cls, offset)
        layouts[cls] = layout
        offset += layout.size
    return layouts, offset


_LAYOUTS, BOARD_SIZE = _build_all()


def layout_of(cls: type[Section]) -> SectionLayout:
    try:
        return _LAYOUTS[cls]
    except KeyError:
        raise TypeError(f"{cls!r} is not a board section") from None


def encode_section(section: Section) -> bytes:
    """The packed payload of ``section`` (without its seq counter)."""
    return layout_of(type(section)).encode(section)


def decode_section(cls: type[S], payload: bytes) -> S:
    """The section ``cls`` packed in ``payload``."""
    section = layout_of(cls).decode(payload)
    assert isinstance(section, cls)
    return section
