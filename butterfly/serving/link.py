"""Stage links: authenticated, encrypted connections between the pipeline's stages and its clients.

A link is one TCP connection. The handshake (dialer = client, listener = server; every frame at most
``HANDSHAKE_MAX``)::

    client -> server  Hello(version, role, epoch, index, nonce_c)
    server -> client  HelloBack(version, nonce_s)
    client -> server  Proof(HMAC-SHA256(secret, "butterfly-link/1 client" | hello_c | hello_s))
    server -> client  Proof(HMAC-SHA256(secret, "butterfly-link/1 server" | hello_c | hello_s))
                      or Refuse(code, reason): a wrong secret ("auth"), another plan epoch ("epoch"),
                      a role this stage does not take ("role")

Both MACs cover both fresh nonces, so a recorded proof is worthless on another connection, and the
role is inside the MAC, so a server proof never passes as a client's. The server checks the client's
proof before it says anything about itself. Keys: HKDF-SHA256 over the secret, salted with both nonces,
with the whole transcript (role, epoch and stage index included) in ``info``: one AEGIS-128L key per
direction (``butterfly.serving.aead`` says why not AES-GCM). Every later frame is
``u32 length | AEGIS-128L(key, nonce = seq, aad = length)`` with an implicit per-direction sequence
number, so a frame that was altered, replayed, reordered or dropped fails to decrypt and the link is
closed (``LinkError``). A link of another epoch has other keys.

Inside a frame: ``u32 header length | msgpack header (a tagged msgspec Struct) | raw tensor bytes``.
Never pickle: the header decodes only into the message types below, and a tensor is the bytes of
``dtype`` x ``shape`` named in the header, checked against its length (``butterfly.serving.tensors``).
This module does not import torch, so the supervisor (which only forwards requests) stays light.

This module owns the handshake, the keys, framing and the message vocabulary. It must not decide
what a message means (``stage`` and ``client`` do) or keep more state than a link's counters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Callable
from typing import Annotated, Final, TypeAlias

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from butterfly.serving import aead

__all__ = [
    "Link",
    "LinkClosed",
    "LinkError",
    "LinkRefused",
    "accept_link",
    "dial_link",
]

LINK_VERSION: Final = 2
"""2: AEGIS-128L frames (1 sealed them with AES-256-GCM)."""
HANDSHAKE_MAX: Final = 4096
MAX_FRAME: Final = 1 << 30
"""Cap on an authenticated frame: a prefill chunk of 8192 tokens x 16384 hidden x 4 bytes is 512 MiB."""
NONCE_BYTES: Final = 32
_LEN: Final = struct.Struct(">I")
_TAG_ROOM: Final = bytes(aead.TAG_BYTES)

PING_S: Final = 0.25
"""An idle link sends a ping this often."""
SILENT_S: Final = 2.0
"""A link silent this long is dead: the failure-detection bound of a request in flight."""

ROLE_STAGE: Final = "stage"
ROLE_CLIENT: Final = "client"

Role = Annotated[str, msgspec.Meta(pattern=r"^(stage|client)$")]
Nonce = Annotated[bytes, msgspec.Meta(min_length=NONCE_BYTES, max_length=NONCE_BYTES)]
Short = Annotated[str, msgspec.Meta(max_length=1024)]


class LinkError(Exception):
    """A link that cannot be trusted any more: bad frame, failed decryption, handshake failure."""


class LinkClosed(LinkError):
    """The other end closed or reset the connection."""


class LinkRefused(LinkError):
    """The other end refused the handshake (``code``: auth, epoch, role) or we refused it."""

    def __init__(self, code: str, reason: str, *, by_peer: bool) -> None:
        super().__init__(f"{'refused by peer' if by_peer else 'refused'} ({code}): {reason}")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


# ---- handshake messages ---------------------------------------------------------------------------


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    version: int
    role: Role
    epoch: Annotated[int, msgspec.Meta(ge=0)]
    index: Annotated[int, msgspec.Meta(ge=-1, le=4096)]
    nonce: Nonce


class HelloBack(msgspec.Struct, frozen=True, tag="hello_back"):
    version: int
    nonce: Nonce


class Proof(msgspec.Struct, frozen=True, tag="proof"):
    mac: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class Refuse(msgspec.Struct, frozen=True, tag="refuse"):
    code: Short
    reason: Short


_Handshake: TypeAlias = Hello | HelloBack | Proof | Refuse
_hs_decoder: msgspec.msgpack.Decoder[_Handshake] = msgspec.msgpack.Decoder(_Handshake)

# ---- session messages -----------------------------------------------------------------------------
SeqId = Annotated[int, msgspec.Meta(ge=0)]


class Ping(msgspec.Struct, frozen=True, tag="ping", array_like=True):
    """Keeps an idle link's silence timer quiet; carries nothing."""


class Abort(msgspec.Struct, frozen=True, tag="abort", array_like=True):
    """A stage failed or lost a neighbour: every stage frees its sequences, and the entry ends the
    requests in flight with ``reason``. ``ring`` is the nonce of the probe that formed the pipeline the
    sender belongs to, so the entry ignores an abort of a pipeline it has already re-formed."""

    reason: Short
    ring: int


class StageInfo(msgspec.Struct, frozen=True, array_like=True):
    """What the entry needs of a stage to admit a sequence: its blocks and its KV cache budget."""

    index: int
    start: int
    stop: int
    budget_bytes: int
    bytes_per_token: int
    node: Short = ""


class Probe(msgspec.Struct, frozen=True, tag="probe", array_like=True):
    """Sent by the entry round the ring once it is connected; each stage appends its ``StageInfo``."""

    nonce: int
    stages: list[StageInfo]


class Admit(msgspec.Struct, frozen=True, array_like=True):
    """A sequence joining the batch: its KV reservation and (for the last stage) how to sample it."""

    seq_id: SeqId
    capacity: Annotated[int, msgspec.Meta(ge=1)]
    temperature: float
    top_p: float
    seed: int | None


class Step(msgspec.Struct, frozen=True, tag="step", array_like=True):
    """One forward step: chunk i is ``n[i]`` tokens of ``seq[i]`` from position ``pos[i]``; the
    activations [sum(n), hidden] follow the header. ``sample[i]``: the last stage samples the chunk's
    last token (prefill chunks before a prompt's end are not sampled)."""

    step_id: int
    seq: list[SeqId]
    pos: list[Annotated[int, msgspec.Meta(ge=0)]]
    n: list[Annotated[int, msgspec.Meta(ge=1)]]
    sample: list[bool]
    admit: list[Admit]
    sent_unix: float
    dtype: Short
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]


class Tokens(msgspec.Struct, frozen=True, tag="tokens", array_like=True):
    """The last stage's answer to a step: the token sampled for each sampled chunk."""

    step_id: int
    seq: list[SeqId]
    tokens: list[int]
    sent_unix: float


class Free(msgspec.Struct, frozen=True, tag="free", array_like=True):
    """These sequences ended: every stage frees their KV cache (and the last stage their sampler)."""

    seq: list[SeqId]


# Client <-> entry.


class Submit(msgspec.Struct, frozen=True, tag="submit", array_like=True):
    req_id: int
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop_token_ids: list[int]


class Cancel(msgspec.Struct, frozen=True, tag="cancel", array_like=True):
    req_id: int


class Token(msgspec.Struct, frozen=True, tag="token", array_like=True):
    req_id: int
    token_id: int


class Done(msgspec.Struct, frozen=True, tag="done", array_like=True):
    req_id: int
    reason: Short
    prompt_tokens: int
    completion_tokens: int


class Error(msgspec.Struct, frozen=True, tag="error", array_like=True):
    req_id: int
    status: int
    code: Short
    message: Short


Message: TypeAlias = Ping | Abort | Probe | Step | Tokens | Free | Submit | Cancel | Token | Done | Error
_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


def split_address(text: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; ValueError naming the text otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"engine address {text!r} is not host:port")
    return host.strip("[]"), int(port)


# ---- the handshake --------------------------------------------------------------------------------


def _joined(label: bytes, *parts: bytes) -> bytes:
    out = bytearray(label)
    for part in parts:
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def _keys(
    secret: bytes, hello_c: bytes, hello_s: bytes, nonce_c: bytes, nonce_s: bytes
) -> tuple[bytes, bytes]:
    info = _joined(b"butterfly-link/2 keys", hashlib.sha256(hello_c + hello_s).digest())
    k = aead.KEY_BYTES
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * k, salt=nonce_c + nonce_s, info=info).derive(secret)
    return okm[:k], okm[k:]


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    try:
        (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if length > limit:
            raise LinkError(f"peer announced a {length}-byte frame; the limit is {limit}")
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise LinkClosed("the peer closed the connection") from None
    except (ConnectionResetError, BrokenPipeError, OSError) as exc:
        raise LinkClosed(f"the connection broke: {exc}") from None


async def _read_hs(reader: asyncio.StreamReader) -> tuple[bytes, _Handshake]:
    raw = await _read_frame(reader, HANDSHAKE_MAX)
    try:
        return raw, _hs_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise LinkRefused("protocol", f"bad handshake frame: {exc}", by_peer=False) from None


def _write_hs(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(_LEN.pack(len(body)) + body)


async def dial_link(
    host: str,
    port: int,
    secret: bytes,
    *,
    role: str,
    epoch: int,
    index: int,
    peer: str = "",
    timeout_s: float = 5.0,
) -> Link:
    """Connect to a stage's listener and run the client side of the handshake."""
    what = peer or f"{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise LinkClosed(f"cannot connect to {what}: {exc or 'timed out'}") from None
    try:
        return await asyncio.wait_for(
            _client_handshake(reader, writer, secret, role, epoch, index, what), timeout_s
        )
    except BaseException as exc:
        writer.close()
        if isinstance(exc, asyncio.TimeoutError):
            raise LinkClosed(f"{what} did not finish the handshake within {timeout_s:.0f}s") from None
        raise


async def _client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    role: str,
    epoch: int,
    index: int,
    what: str,
) -> Link:
    nonce_c = secrets.token_bytes(NONCE_BYTES)
    hello_c = _encoder.encode(Hello(LINK_VERSION, role, epoch, index, nonce_c))
    _write_hs(writer, hello_c)
    hello_s, msg = await _read_hs(reader)
    if isinstance(msg, Refuse):
        raise LinkRefused(msg.code, msg.reason, by_peer=True)
    if not isinstance(msg, HelloBack):
        raise LinkRefused("protocol", f"expected hello_back, got {type(msg).__name__}", by_peer=False)
    nonce_s = msg.nonce
    if msg.version != LINK_VERSION:
        raise LinkRefused(
            "version", f"link version {msg.version}, this node speaks {LINK_VERSION}", by_peer=False
        )
    _write_hs(
        writer,
        _encoder.encode(
            Proof(hmac.digest(secret, _joined(b"butterfly-link/1 client", hello_c, hello_s), "sha256"))
        ),
    )
    _, msg = await _read_hs(reader)
    if isinstance(msg, Refuse):
        raise LinkRefused(msg.code, msg.reason, by_peer=True)
    if not isinstance(msg, Proof):
        raise LinkRefused("protocol", f"expected proof, got {type(msg).__name__}", by_peer=False)
    expected = hmac.digest(secret, _joined(b"butterfly-link/1 server", hello_c, hello_s), "sha256")
    if not hmac.compare_digest(expected, msg.mac):
        raise LinkRefused("auth", f"{what} does not hold this cluster's secret", by_peer=False)
    c2s, s2c = _keys(secret, hello_c, hello_s, nonce_c, nonce_s)
    return Link(reader, writer, send_key=c2s, recv_key=s2c, peer=what, role=role, epoch=epoch, index=index)


async def accept_link(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    admit: Callable[[Hello], tuple[str, str] | None],
    *,
    timeout_s: float = 5.0,
) -> Link:
    """Run the server side of the handshake on an accepted connection. ``admit`` sees the client's
    hello once its proof has checked out and returns (code, reason) to refuse it."""
    try:
        return await asyncio.wait_for(_server_handshake(reader, writer, secret, admit), timeout_s)
    except asyncio.TimeoutError:
        raise LinkClosed(f"the client did not finish the handshake within {timeout_s:.0f}s") from None


async def _server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: bytes,
    admit: Callable[[Hello], tuple[str, str] | None],
) -> Link:
    peername = writer.get_extra_info("peername")
    what = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "?"
    hello_c, hello = await _read_hs(reader)
    if not isinstance(hello, Hello):
        raise LinkRefused("protocol", f"expected hello, got {type(hello).__name__}", by_peer=False)
    nonce_s = secrets.token_bytes(NONCE_BYTES)
    hello_s = _encoder.encode(HelloBack(LINK_VERSION, nonce_s))
    _write_hs(writer, hello_s)
    _, proof = await _read_hs(reader)
    if not isinstance(proof, Proof):
        raise LinkRefused("protocol", f"expected proof, got {type(proof).__name__}", by_peer=False)
    expected = hmac.digest(secret, _joined(b"butterfly-link/1 client", hello_c, hello_s), "sha256")
    if not hmac.compare_digest(expected, proof.mac):
        _write_hs(writer, _encoder.encode(Refuse("auth", "authentication failed")))
        raise LinkRefused("auth", f"{what} does not hold this cluster's secret", by_peer=False)
    if hello.version != LINK_VERSION:
        reason = f"link version {hello.version}, this node speaks {LINK_VERSION}"
        _write_hs(writer, _encoder.encode(Refuse("version", reason)))
        raise LinkRefused("version", reason, by_peer=False)
    verdict = admit(hello)
    if verdict is not None:
        _write_hs(writer, _encoder.encode(Refuse(verdict[0], verdict[1])))
        raise LinkRefused(verdict[0], verdict[1], by_peer=False)
    _write_hs(
        writer,
        _encoder.encode(
            Proof(hmac.digest(secret, _joined(b"butterfly-link/1 server", hello_c, hello_s), "sha256"))
        ),
    )
    c2s, s2c = _keys(secret, hello_c, hello_s, hello.nonce, nonce_s)
    return Link(
        reader,
        writer,
        send_key=s2c,
        recv_key=c2s,
        peer=what,
        role=hello.role,
        epoch=hello.epoch,
        index=hello.index,
    )


# ---- the session ----------------------------------------------------------------------------------


class Link:
    """An authenticated, encrypted connection: ``send`` and ``recv`` whole messages (and tensors)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        send_key: bytes,
        recv_key: bytes,
        peer: str,
        role: str,
        epoch: int,
        index: int,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._send = aead.Aegis128L(send_key)
        self._recv = aead.Aegis128L(recv_key)
        self._send_seq = 0
        self._recv_seq = 0
        self.peer = peer
        self.role = role
        self.epoch = epoch
        self.index = index
        self.last_sent = time.monotonic()
        self.last_recv = time.monotonic()
        self.bytes_sent = 0
        self.closed = False

    def send_nowait(self, msg: Message, tensor: memoryview | bytes = b"") -> None:
        """Encrypt and queue one frame; synchronous, so frames of different tasks never interleave.
        One copy of the tensor, into the frame, which is then sealed where it lies."""
        if self.closed:
            raise LinkClosed(f"the link to {self.peer} is closed")
        header = _encoder.encode(msg)
        frame = bytearray().join((_LEN.pack(len(header)), header, tensor, _TAG_ROOM))
        length = _LEN.pack(len(frame))
        self._send.seal(frame, self._send_seq.to_bytes(aead.NONCE_BYTES, "big"), length)
        self._send_seq += 1
        self.writer.writelines((length, frame))
        self.bytes_sent += len(frame) + len(length)
        self.last_sent = time.monotonic()

    async def send(self, msg: Message, tensor: memoryview | bytes = b"") -> None:
        self.send_nowait(msg, tensor)
        try:
            await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError, OSError) as exc:
            raise LinkClosed(f"the connection to {self.peer} broke: {exc}") from None

    async def recv(self) -> tuple[Message, memoryview]:
        """The next message and the raw tensor bytes after its header (empty when none), a view of
        the decrypted frame (no copy)."""
        frame = await _read_frame(self.reader, MAX_FRAME)
        nonce = self._recv_seq.to_bytes(aead.NONCE_BYTES, "big")
        plain = self._recv.open(frame, nonce, _LEN.pack(len(frame)))
        if plain is None:
            raise LinkError(
                f"frame {self._recv_seq} from {self.peer} failed authentication (altered, replayed, "
                "reordered, or sealed with another key)"
            )
        self._recv_seq += 1
        self.last_recv = time.monotonic()
        if len(plain) < _LEN.size:
            raise LinkError(f"frame from {self.peer} is shorter than its header length")
        (hlen,) = _LEN.unpack_from(plain)
        if hlen > len(plain) - _LEN.size:
            raise LinkError(f"frame from {self.peer} announces a {hlen}-byte header it does not carry")
        view = memoryview(plain)
        try:
            msg = _decoder.decode(view[_LEN.size : _LEN.size + hlen])
        except msgspec.DecodeError as exc:
            raise LinkError(f"bad frame from {self.peer}: {exc}") from None
        return msg, view[_LEN.size + hlen :]

    def close(self) -> None:
        self.closed = True
        if not self.writer.is_closing():
            self.writer.close()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()
