"""The peer wire format: length-prefixed frames and the typed messages they carry.

A frame is a 4-byte big-endian length, then a msgpack body (msgspec tagged Structs, never pickle),
then -- on a session without TLS -- a 32-byte HMAC tag (see ``butterfly.net.auth``); the length counts
body and tag. Two vocabularies exist:

* the handshake (``ClientHello``, ``ServerHello``, ``ClientProof``, ``ServerProof``, ``Refusal``),
  read with a small fixed cap (``HANDSHAKE_MAX_FRAME``) so an unauthenticated peer can never make a
  node buffer more than a few KiB. The hellos and ``Refusal`` are map-encoded and must keep their
  fields in every protocol version: they are what two incompatible versions still read from each
  other to refuse clearly.
* the session (``Data``, ``Ping``, ``Goodbye``), read with the configured ``max_frame_bytes``.
  ``Data`` carries opaque bytes on a named channel ("raft", "capability", "validation"): this module
  never imports the messages of the modules that use a channel.

This module owns encoding, decoding and the size checks. It must not authenticate, keep connection
state or decide what a message means; it does no I/O beyond reading and writing whole frames on the
stream it is given.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Annotated, Final, TypeAlias

import msgspec

PROTOCOL_VERSION: Final = (1, 0)
"""(major, minor). Peers whose majors differ refuse each other. Within a major, the session uses the lower
of the two minors (``Session.version``): a message kind or field added in minor N is sent only to peers
whose negotiated minor is >= N, since older peers drop a connection on a frame they cannot decode."""

HEADER: Final = struct.Struct(">I")
HANDSHAKE_MAX_FRAME: Final = 4096
"""Cap on every frame before the peer has proved the secret (the largest handshake frame is ~500 B)."""
DEFAULT_MAX_FRAME: Final = 16 << 20
"""Default cap on a session frame body; ``TransportLimits.max_frame_bytes`` overrides it."""
NONCE_BYTES: Final = 32
MAC_BYTES: Final = 32

CHANNEL_RAFT: Final = "raft"
CHANNEL_CAPABILITY: Final = "capability"
CHANNEL_VALIDATION: Final = "validation"

NodeIdText = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,63}$")]
ChannelName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_.-]{1,32}$")]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
Mac = Annotated[bytes, msgspec.Meta(min_length=MAC_BYTES, max_length=MAC_BYTES)]
Version = Annotated[int, msgspec.Meta(ge=0, le=65535)]
ShortText = Annotated[str, msgspec.Meta(max_length=512)]


class FrameError(Exception):
    """A frame that cannot be trusted: malformed, of the wrong kind, or over its size cap."""


class FrameTooLarge(FrameError):
    """A frame (announced by a peer, or about to be sent) exceeds the cap."""


class ConnectionLost(Exception):
    """The other end closed the connection or reset it."""


# ---- handshake -----------------------------------------------------------------------------------


class ClientHello(msgspec.Struct, frozen=True, tag="client_hello"):
    """First frame of every connection, from the dialing side: its version and a fresh nonce."""

    major: Version
    minor: Version
    nonce: Nonce


class ServerHello(msgspec.Struct, frozen=True, tag="server_hello"):
    """The listener's answer: its version and a fresh nonce. Deliberately nothing else: a peer that has
    not proved the secret learns no node id, cluster name or state."""

    major: Version
    minor: Version
    nonce: Nonce


class PeerIdentity(msgspec.Struct, frozen=True):
    """Who a node says it is. Sent encoded inside a proof, so the MAC covers the exact bytes sent.

    ``incarnation`` is random per process start: it tells a restarted peer (new incarnation, same
    address) from a second process using the same node id, and a node's own listener from another
    node. ``advertise`` is the ``host:port`` peers should dial. ``cluster_id`` names the Raft bootstrap
    the node belongs to, empty until it has one (logs of two different bootstraps must never meet)."""

    node_id: NodeIdText
    cluster_name: Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
    incarnation: Annotated[bytes, msgspec.Meta(min_length=8, max_length=32)]
    advertise: Annotated[str, msgspec.Meta(max_length=300)]
    cluster_id: Annotated[str, msgspec.Meta(max_length=128)] = ""


class ClientProof(msgspec.Struct, frozen=True, tag="client_proof"):
    """The dialer's identity (msgpack of ``PeerIdentity``) and its HMAC over the transcript."""

    identity: Annotated[bytes, msgspec.Meta(max_length=1024)]
    mac: Mac


class ServerProof(msgspec.Struct, frozen=True, tag="server_proof"):
    """The listener's identity and its HMAC; sent only after the dialer's proof checked out."""

    identity: Annotated[bytes, msgspec.Meta(max_length=1024)]
    mac: Mac


class Refusal(msgspec.Struct, frozen=True, tag="refusal"):
    """Why the sender will not talk; the connection closes after it. ``major``/``minor`` are the
    sender's version, so an incompatible peer can say exactly what it met."""

    code: ShortText
    reason: ShortText
    major: Version
    minor: Version


HandshakeMessage: TypeAlias = ClientHello | ServerHello | ClientProof | ServerProof | Refusal


# ---- session -------------------------------------------------------------------------------------


class Data(msgspec.Struct, frozen=True, tag="data", array_like=True):
    """Opaque bytes for one channel; the channel's owner decodes ``payload``."""

    channel: ChannelName
    payload: bytes


class Ping(msgspec.Struct, frozen=True, tag="ping", array_like=True):
    """Sent on an otherwise idle connection so the other side's idle timer sees the peer alive."""


class Goodbye(msgspec.Struct, frozen=True, tag="goodbye", array_like=True):
    """The sender is closing this connection on purpose (shutdown, a duplicate connection, a refused
    identity); the receiver logs ``reason`` instead of a connection error."""

    code: ShortText
    reason: ShortText


SessionMessage: TypeAlias = Data | Ping | Goodbye

_encoder = msgspec.msgpack.Encoder()
_handshake_decoder: msgspec.msgpack.Decoder[HandshakeMessage] = msgspec.msgpack.Decoder(HandshakeMessage)
_session_decoder: msgspec.msgpack.Decoder[SessionMessage] = msgspec.msgpack.Decoder(SessionMessage)
_identity_decoder: msgspec.msgpack.Decoder[PeerIdentity] = msgspec.msgpack.Decoder(PeerIdentity)


def encode(message: HandshakeMessage | SessionMessage | PeerIdentity) -> bytes:
    """The msgpack body of one message (no length prefix)."""
    return _encoder.encode(message)


def decode_handshake(body: bytes) -> HandshakeMessage:
    try:
        return _handshake_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(f"bad handshake frame: {exc}") from None


def decode_session(body: bytes) -> SessionMessage:
    try:
        return _session_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(f"bad session frame: {exc}") from None


def decode_identity(body: bytes) -> PeerIdentity:
    try:
        return _identity_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise FrameError(f"bad peer identity: {exc}") from None


class FrameStream:
    """Whole frames over one asyncio stream pair. Reads enforce the cap given per call, *before*
    buffering the body, so the announced length alone can never make us allocate."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, limit: int) -> bytes:
        """The next frame's bytes (body plus any tag); raises FrameTooLarge or ConnectionLost."""
        try:
            head = await self.reader.readexactly(HEADER.size)
            (length,) = HEADER.unpack(head)
            if length > limit:
                raise FrameTooLarge(f"peer announced a {length}-byte frame; the limit is {limit}")
            return await self.reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise ConnectionLost("the peer closed the connection") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionLost(f"the connection broke: {exc}") from None

    def write(self, body: bytes, tag: bytes = b"") -> None:
        """Queue one frame; synchronous, so frames written by different tasks never interleave."""
        self.writer.writelines((HEADER.pack(len(body) + len(tag)), body, tag))

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionLost(f"the connection broke: {exc}") from None

    def buffered(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return self.writer.transport.get_write_buffer_size()

    def peer_host(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, tuple) and peer else "?"

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()

    async def aclose(self, timeout_s: float = 1.0) -> None:
        """Close and wait until the socket is released; a peer that stops reading cannot hold it: after
        ``timeout_s`` the unsent bytes are discarded."""
        self.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout_s)
        except asyncio.TimeoutError:
            self.writer.transport.abort()
        except (OSError, ConnectionError):
            pass  # the connection was already broken; it is released all the same
