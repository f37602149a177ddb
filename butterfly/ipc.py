"""Messages between the supervisor and its children, and the framing that carries them.

Each child gets one end of a Unix stream socketpair. Frames are a 4-byte big-endian length and a
msgpack body (msgspec tagged Structs, never pickle), capped at MAX_FRAME bytes. Commands flow from the
supervisor to a child, reports flow back. The shared-memory board carries progress; this channel
carries only the decisions and results that must not be lost.

This module must not import the supervisor or any child: both sides import it.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import msgspec

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


class ChannelClosed(Exception):
    """The other end of the channel went away (process exit or crash)."""


class FrameError(Exception):
    """A frame was malformed or too large; the channel cannot be trusted any more."""


# ---- supervisor -> child -------------------------------------------------------------------------


class Init(msgspec.Struct, tag=True, frozen=True):
    """First frame to every child: the effective config (TOML) and the board to write to."""

    config_toml: str
    config_base_dir: str
    board_name: str
    arena_name: str
    # The supervisor began the arena under arena_name (butterfly.loader.prewarm): the first loader
    # of a node adopts it; for any other child, and any later loader, False.
    arena_prewarmed: bool = False
    # For a loader: the bytes this node's earlier loaders read from the model source, from which
    # its board's bytes_downloaded_total (model_bytes_downloaded_total) counts on, so that the
    # counter runs since the node started, across loader restarts. 0 for any other child.
    downloaded_bytes: int = 0


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    pass


class StartCluster(msgspec.Struct, tag=True, frozen=True):
    """Join (or form) the cluster; the child reports progress, plans and the serving gate."""


class LocalValidated(msgspec.Struct, tag=True, frozen=True):
    """This node loaded and re-hashed its assignment: its unit digests (the data of its Merkle
    leaves, in unit order) go to the coordinator with a range proof."""

    epoch: int
    term: int
    start: int
    stop: int
    units: list[int]
    unit_digests: list[bytes]


class NodeFault(msgspec.Struct, tag=True, frozen=True):
    """This node cannot serve blocks [start, stop) now, and why ('' once it can again): the cluster
    child tells every peer. ``failed``: for good (the node is FAILED): it must not be planned for."""

    reason: str
    failed: bool = False
    start: int = 0
    stop: int = 0


class LoadAssignment(msgspec.Struct, tag=True, frozen=True):
    epoch: int
    term: int
    start: int
    stop: int
    # After a validation failure: skip the cache, drop its entries for these tensors, read the source.
    refetch: bool = False


class ValidateArena(msgspec.Struct, tag=True, frozen=True):
    epoch: int
    loaded: Loaded
    # The validator followed this load (``Landing``, ``TensorsLanded``): the digests it took of tensors
    # as they landed count, and only the rest are hashed now. False: every tensor is hashed now.
    follow: bool = False


class Landing(msgspec.Struct, tag=True, frozen=True):
    """The loader streams ``tensors`` (placement order) into ``arena_name`` for ``epoch`` now; relayed
    to the validator, which hashes each tensor as ``TensorsLanded`` names it, beside the stream."""

    epoch: int
    arena_name: str
    tensors: list[TensorPlacement]


class TensorsLanded(msgspec.Struct, tag=True, frozen=True):
    """Tensors of the current ``Landing`` (indices into its list) that are in the arena with every chunk
    matched against the manifest; the loader does not write them again in this load."""

    epoch: int
    indices: list[int]


class StartScrub(msgspec.Struct, tag=True, frozen=True):
    """Re-hash ``loaded``'s tensors in the background, pass after pass, until told otherwise."""

    epoch: int
    loaded: Loaded


class StopScrub(msgspec.Struct, tag=True, frozen=True):
    """Stop scrubbing and unmap the arena (the loader is about to replace it)."""


class RepairTensors(msgspec.Struct, tag=True, frozen=True):
    """Read these tensors of the current assignment again, from the cache or the source, verified,
    into their places in the arena."""

    epoch: int
    tensors: list[str]


# ---- child -> supervisor -------------------------------------------------------------------------


class ClusterProgress(msgspec.Struct, tag=True, frozen=True):
    """The cluster child's view moved: phase is 'discovery', 'election' or 'assignment'."""

    phase: str
    waiting_reason: str = ""


class Waiting(msgspec.Struct, tag=True, frozen=True):
    """Why the cluster is not moving on, whole ('' once it is); the latest one replaces the last."""

    reason: str


class PeerFault(msgspec.Struct, frozen=True, kw_only=True):
    """A peer's fault as it reports it: why it cannot serve blocks [start, stop) (0, 0: none held)."""

    node_id: str
    reason: str
    failed: bool
    start: int
    stop: int


class PeerFaults(msgspec.Struct, tag=True, frozen=True):
    """Every live peer that reports a fault, whole; the latest list replaces the last."""

    faults: list[PeerFault]


class StageEndpoint(msgspec.Struct, frozen=True, array_like=True):
    """One stage of a committed plan: the node holding blocks [start, stop) and where its engine
    listens for stage links and forwarded requests ("host:port"; "" while the node has not said)."""

    node_id: str
    start: int
    stop: int
    engine_address: str


class PlanAssigned(msgspec.Struct, tag=True, frozen=True):
    """A committed plan gives this node blocks [start, stop) at (epoch, term). ``stages``: every stage
    of the plan in pipeline order (the serving pipeline's ring)."""

    epoch: int
    term: int
    start: int
    stop: int
    num_blocks: int
    stages: list[StageEndpoint] = []


class NodeLayers(msgspec.Struct, frozen=True, array_like=True):
    """One node's blocks [start, stop) in a plan."""

    node_id: str
    start: int
    stop: int


class PlanView(msgspec.Struct, tag=True, frozen=True):
    """The cluster's latest applied plan, every node's range (for status; PlanAssigned is what acts)."""

    epoch: int
    assignments: list[NodeLayers]


class RangeAccepted(msgspec.Struct, tag=True, frozen=True):
    """The coordinator checked this node's unit digests for (epoch, its blocks) against the manifest
    root and accepted them: its own range passed validation (what READY means)."""

    epoch: int


class ClusterOperational(msgspec.Struct, tag=True, frozen=True):
    """The coordinator committed 'operational at epoch E': the node may serve."""

    epoch: int
    term: int


class TensorPlacement(msgspec.Struct, frozen=True, array_like=True):
    """Where a tensor sits in the arena; ``blake3`` is the manifest's digest of its bytes (what the
    validator compares with), empty when the model has no manifest."""

    name: str
    unit: int
    arena_offset: int
    length: int
    blake3: bytes = b""


class ChunkDigest(msgspec.Struct, frozen=True, array_like=True):
    arena_offset: int
    length: int
    xxh3: int


class Mismatch(msgspec.Struct, frozen=True, kw_only=True):
    """One tensor whose bytes in memory are not the model's (butterfly.validator.check finds them).

    ``expected``/``found`` are its BLAKE3 (hex) when the manifest gave one; ``offset`` is the first
    differing chunk's offset in the tensor and ``length`` that chunk's size, None when every chunk
    matched the loader's digests and only the whole-tensor digest differs (a manifest whose chunk
    digests were rewritten to match tampered bytes). ``chunk_expected``/``chunk_found`` are that
    chunk's xxh3 (hex) as the loader checked it and as it is now.
    """

    tensor: str
    unit: int
    layer: str
    arena_offset: int
    expected: str
    found: str
    offset: int | None = None
    length: int | None = None
    chunk_expected: str = ""
    chunk_found: str = ""
    chunks_bad: int = 0

    def __str__(self) -> str:
        if self.offset is not None:
            where = (
                f" at byte {self.offset} ({self.length}-byte chunk: xxh3 expected {self.chunk_expected}, "
                f"found {self.chunk_found}; {self.chunks_bad} chunk(s) differ)"
            )
        else:
            where = " (every chunk matches the digests the loader checked; the whole-tensor digest does not)"
        digest = f": BLAKE3 expected {self.expected}, found {self.found}" if self.expected else ""
        return f"tensor {self.tensor} ({self.layer}, arena offset {self.arena_offset}){where}{digest}"


class TensorSpec(msgspec.Struct, frozen=True, array_like=True):
    """A placed tensor's safetensors dtype and shape, for the engine's views of the arena."""

    name: str
    dtype: str
    shape: list[int]


class Loaded(msgspec.Struct, tag=True, frozen=True):
    """The loader filled the arena for (epoch, range); digests are the xxh3 of each chunk as read.
    ``specs`` and ``model_config`` (config.json's text, covered by the manifest) are what the engine
    child needs to build its stage over the arena without reading the source again."""

    epoch: int
    start: int
    stop: int
    arena_name: str
    arena_bytes: int
    tensors: list[TensorPlacement]
    chunks: list[ChunkDigest]
    step_seconds: dict[str, float]
    specs: list[TensorSpec] = []
    model_config: str = ""
    model_config_where: str = ""


class StartEngine(msgspec.Struct, tag=True, frozen=True):
    """Serve ``loaded``'s blocks as one stage of ``stages`` (plan ``epoch``): map the arena read-only,
    build the engine's stage over it, join the ring."""

    epoch: int
    loaded: Loaded
    stages: list[StageEndpoint]


class StopEngine(msgspec.Struct, tag=True, frozen=True):
    """Stop serving and let go of the arena (before the loader replaces it)."""


class EngineState(msgspec.Struct, tag=True, frozen=True):
    """The engine child's serving state: sent when it changes and every second while it serves.
    ``hop_seconds``: per-hop transfer times observed since the last report, ``step_failures``: steps
    the stage failed with an unexpected error since then (for the metrics)."""

    epoch: int
    serving: bool
    reason: str
    running: int
    waiting: int
    kv_bytes_in_use: int
    kv_bytes_total: int
    hop_seconds: list[float] = []
    step_failures: int = 0


class Validated(msgspec.Struct, tag=True, frozen=True):
    """Digests of the arena's layer units (ascending unit index) and the Merkle root over them."""

    epoch: int
    units: list[int]
    unit_digests: list[bytes]
    root: bytes
    bytes_hashed: int


class ScrubMismatch(msgspec.Struct, tag=True, frozen=True):
    """Scrubbing found weights in memory that are not the model's; ``reason`` says it whole."""

    epoch: int
    mismatches: list[Mismatch]
    reason: str


class Repaired(msgspec.Struct, tag=True, frozen=True):
    """The loader read ``tensors`` again, each chunk checked against the manifest as it landed."""

    epoch: int
    tensors: list[str]
    from_cache: int
    from_source: int


class Failed(msgspec.Struct, tag=True, frozen=True):
    """A child could not do what it was asked; `fatal` means retrying cannot help (bad model, config)."""

    what: str
    reason: str
    fatal: bool = False


Command = (
    Init
    | Shutdown
    | StartCluster
    | LocalValidated
    | NodeFault
    | LoadAssignment
    | RepairTensors
    | ValidateArena
    | Landing
    | TensorsLanded
    | StartScrub
    | StopScrub
    | StartEngine
    | StopEngine
)
Report = (
    ClusterProgress
    | Waiting
    | PeerFaults
    | PlanAssigned
    | PlanView
    | RangeAccepted
    | ClusterOperational
    | Landing
    | TensorsLanded
    | Loaded
    | Validated
    | ScrubMismatch
    | Repaired
    | Failed
    | EngineState
)

_enc = msgspec.msgpack.Encoder()
_cmd_dec = msgspec.msgpack.Decoder(Command)
_rep_dec = msgspec.msgpack.Decoder(Report)


def encode(msg: Command | Report) -> bytes:
    body = _enc.encode(msg)
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(body)) + body


def decode_command(body: bytes) -> Command:
    try:
        return _cmd_dec.decode(body)
    except msgspec.DecodeError as e:
        raise FrameError(f"bad command frame: {e}") from e


def decode_report(body: bytes) -> Report:
    try:
        return _rep_dec.decode(body)
    except msgspec.DecodeError as e:
        raise FrameError(f"bad report frame: {e}") from e


def _check_len(n: int) -> int:
    if n > MAX_FRAME:
        raise FrameError(f"peer announced a {n}-byte frame; the limit is {MAX_FRAME}")
    return n


class SyncChannel:
    """The child's end: blocking send/recv on a socket (recv from one reader thread only)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ChannelClosed("supervisor closed the channel")
            got += k
        return bytes(buf)

    def recv(self) -> Command:
        (n,) = _LEN.unpack(self._recv_exact(_LEN.size))
        return decode_command(self._recv_exact(_check_len(n)))

    def send(self, msg: Report) -> None:
        try:
            self.sock.sendall(encode(msg))
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed("supervisor closed the channel") from e

    def close(self) -> None:
        self.sock.close()


class AsyncChannel:
    """One end of a channel on the event loop: the supervisor's end of each child's channel, or the
    cluster child's end of its own (that child runs asyncio)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> AsyncChannel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_FRAME + 8)
        return cls(reader, writer)

    async def _recv_body(self) -> bytes:
        try:
            head = await self.reader.readexactly(_LEN.size)
            (n,) = _LEN.unpack(head)
            return await self.reader.readexactly(_check_len(n))
        except (asyncio.IncompleteReadError, ConnectionResetError) as e:
            raise ChannelClosed("the other end closed the channel") from e

    async def recv_report(self) -> Report:
        return decode_report(await self._recv_body())

    async def recv_command(self) -> Command:
        return decode_command(await self._recv_body())

    async def send(self, msg: Command | Report) -> None:
        try:
            self.writer.write(encode(msg))
            await self.writer.drain()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ChannelClosed("the other end closed the channel") from e

    def close(self) -> None:
        self.writer.close()
