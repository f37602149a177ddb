"""Peer authentication: the cluster secret, the mutual challenge-response, per-frame integrity, TLS.

The handshake (dialer = client, listener = server), every frame capped at ``HANDSHAKE_MAX_FRAME``::

    client -> server  ClientHello(version, nonce_c)
    server -> client  ServerHello(version, nonce_s)        or Refusal("version") when majors differ
    client -> server  ClientProof(identity_c, mac_c)
    server -> client  ServerProof(identity_s, mac_s)       or Refusal("auth" | "cluster" | ...)

    mac_c = HMAC-SHA256(secret, "butterfly-peer/<major> client" | hello_c | hello_s | identity_c)
    mac_s = HMAC-SHA256(secret, "butterfly-peer/<major> server" | hello_c | hello_s | identity_c | identity_s)

where ``|`` joins length-prefixed byte strings and the hellos and identities are the exact bytes that
crossed the wire (both versions, both nonces, both node ids, the cluster name). Why it holds:

* no replay: each side's MAC covers the nonce the *other* side just drew, so a recorded proof is
  worthless on the next connection;
* no reflection: the role is inside the MAC, so a server proof can never pass as a client proof
  (and a node refuses a peer claiming its own node id);
* the client proves first and the server reveals its identity only after checking that proof: a
  peer without the secret gets a version number, a nonce and a refusal -- no node id, no cluster
  name, no session frame. A server without the secret gets a client MAC it cannot use anywhere;
* comparisons are constant-time (``hmac.compare_digest``).

After the handshake both sides derive direction keys from the secret and the whole transcript. Without
TLS every session frame carries ``HMAC-SHA256(key_dir, seq | body)`` with an implicit per-direction
sequence number: an on-path attacker can neither forge, alter, replay, reorder nor drop a frame
without the next check failing (the connection is then closed). With TLS (``make_tls_contexts``: both
sides present a certificate chaining to ``tls_ca``) the TLS record layer protects the frames and the
secret handshake still runs inside it, so a certificate alone never admits a node. Both MACs then also
cover the SHA-256 of both TLS certificates as each side saw them (``tls_binding``): a relay that
terminates TLS with a certificate of its own -- even one the CA signed -- makes the two sides' views
differ and the proofs fail, so it can never read or alter the session it relays.

This module owns the secret file's checks, the handshake's message order and cryptography, and frame
sealing. It must not keep connection state, decide which connection to keep, or log: it raises
``HandshakeError`` saying who refused what, and the transport logs and counts.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import ssl
import stat
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from butterfly.net.frames import (
    HANDSHAKE_MAX_FRAME,
    MAC_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    ClientHello,
    ClientProof,
    FrameError,
    FrameStream,
    HandshakeMessage,
    PeerIdentity,
    Refusal,
    ServerHello,
    ServerProof,
    decode_handshake,
    decode_identity,
    encode,
)

MIN_SECRET_BYTES: Final = 32
_MAX_SECRET_FILE: Final = 64 << 10
_HEX: Final = frozenset(string.hexdigits.encode())

# Refusal codes, shared by both ends so a log line can say what happened in one word.
REFUSED_VERSION: Final = "version"
REFUSED_AUTH: Final = "auth"
REFUSED_CLUSTER: Final = "cluster"
REFUSED_DUPLICATE_ID: Final = "duplicate-id"
REFUSED_SELF: Final = "self"
REFUSED_PROTOCOL: Final = "protocol"

Verdict = tuple[str, str] | None
"""``(code, reason)`` to refuse a peer, or None to admit it."""


class SecretError(Exception):
    """The cluster secret file is missing, unreadable, too short or readable by every user."""


class TlsConfigError(Exception):
    """A certificate, key or CA file could not be loaded."""


class IntegrityError(Exception):
    """A session frame's MAC did not verify: forged, altered, replayed, reordered or dropped frames."""


class HandshakeError(Exception):
    """The handshake did not produce a session.

    ``code`` is one of the ``REFUSED_*`` words, ``by_peer`` says whether the other side refused us (we
    read its ``Refusal``) or we refused it, ``peer_version`` is the peer's version when it was seen and
    ``peer`` its verified identity when the refusal came after the proofs."""

    def __init__(
        self,
        code: str,
        reason: str,
        *,
        by_peer: bool,
        peer_version: tuple[int, int] | None = None,
        peer: PeerIdentity | None = None,
    ) -> None:
        self.code = code
        self.reason = reason
        self.by_peer = by_peer
        self.peer_version = peer_version
        self.peer = peer
        super().__init__(f"{'refused by peer' if by_peer else 'refused'} ({code}): {reason}")


# ---- the secret ----------------------------------------------------------------------------------


def load_secret(path: Path) -> bytes:
    """Read the cluster secret; raise SecretError saying exactly what is wrong and how to fix it.

    The file's bytes are the HMAC key, so every node must hold the same file. A file of hex digits
    (the package's postinst writes 64) counts as half its length in random bytes, and trailing
    whitespace after them is ignored."""
    how = f"create it once with `butterfly-admin secret create {path}` and copy it"
    try:
        # O_NONBLOCK: a FIFO at the path must be refused below, not waited on for a writer for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretError(f"cluster secret {path} does not exist: {how} to every node") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise SecretError(symlink_problem(path) + ": point secret_file at the file itself") from None
        raise SecretError(f"cluster secret {path} cannot be opened: {exc.strerror or exc}") from None
    info = os.fstat(fd)  # of the opened file: no race with a rename in between
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)  # before fdopen, which refuses a directory with an exception of its own
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise SecretError(f"cluster secret {path} is {what}")
    with os.fdopen(fd, "rb") as file:
        if info.st_mode & 0o007:
            raise SecretError(
                f"cluster secret {path} is accessible to every user (mode {stat.S_IMODE(info.st_mode):04o}): "
                f"run `chmod o-rwx {path}` (root:butterfly 0640 is the packaged mode)"
            )
        data = file.read(_MAX_SECRET_FILE + 1)
    if len(data) > _MAX_SECRET_FILE:
        raise SecretError(f"cluster secret {path} is larger than {_MAX_SECRET_FILE} bytes: not a key file")
    # Hex text may end in a newline an editor added; binary keys are used byte for byte (a random key
    # can end in a 0x0a byte, and stripping it would make nodes disagree only about some keys).
    text = data.rstrip(b" \t\r\n")
    is_hex = bool(text) and all(byte in _HEX for byte in text)
    secret = text if is_hex else data
    random_bytes = len(secret) // 2 if is_hex else len(secret)
    if random_bytes < MIN_SECRET_BYTES:
        found = f"{len(secret)} hex digits" if is_hex else f"{len(secret)} bytes"
        raise SecretError(
            f"cluster secret {path} is too short: {found}, at least {MIN_SECRET_BYTES} random bytes "
            f"({2 * MIN_SECRET_BYTES} hex digits) are needed; {how} to every node"
        )
    return secret


def symlink_problem(path: Path) -> str:
    """What is wrong with a secret path that is a symbolic link: it is never followed (O_NOFOLLOW)."""
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return f"cluster secret {path} is a symbolic link{target}, which is not followed"


def generate_secret(path: Path) -> None:
    """Write a new secret (32 random bytes as 64 hex digits, mode 0600); refuses to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask
            file.write(secrets.token_hex(MIN_SECRET_BYTES).encode())
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        # The file is ours (O_EXCL). Left empty or partial (a full disk), every later `secret create`
        # would refuse it as existing and every node would refuse it as too short.
        os.unlink(path)
        raise


# ---- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsContexts:
    """One context to accept with and one to dial with; both require the peer's certificate."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    certificate: bytes
    """This node's certificate (DER), for ``tls_binding``."""


def make_tls_contexts(cert: Path, key: Path, ca: Path) -> TlsContexts:
    """Mutual TLS contexts: present ``cert``/``key``, require a peer certificate chaining to ``ca``, the
    cluster's own CA and nothing else (the system store is never loaded: any public CA could otherwise
    sign a certificate that gets a stranger to the secret handshake).

    Host names are not checked: peers are dialed by whatever address discovery returned, which a
    certificate need not name. The certificate proves the peer belongs to the CA's set; its node id
    is proven by the secret handshake that runs inside the TLS session."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load TLS certificate {cert} with key {key}: {exc}") from None
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load TLS CA bundle {ca}: {exc}") from None
        if not context.get_ca_certs():
            raise TlsConfigError(f"TLS CA bundle {ca} holds no CA certificate")
    pem = cert.read_text(errors="replace")
    end = pem.find(ssl.PEM_FOOTER)
    return TlsContexts(server, client, ssl.PEM_cert_to_DER_cert(pem[: end + len(ssl.PEM_FOOTER)]))


def tls_binding(stream: FrameStream, certificate: bytes, *, is_client: bool) -> bytes:
    """What binds the secret handshake to this TLS session: SHA-256 of the client's and the server's
    certificate as this side saw them (RFC 5929's tls-server-end-point idea, applied to both ends,
    which also works on TLS 1.3 where tls-unique does not exist)."""
    ssl_object = stream.writer.get_extra_info("ssl_object")
    peer = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not peer:
        raise HandshakeError(REFUSED_PROTOCOL, "the TLS peer presented no certificate", by_peer=False)
    client, server = (certificate, peer) if is_client else (peer, certificate)
    return b"tls-certificates" + hashlib.sha256(client).digest() + hashlib.sha256(server).digest()


# ---- transcript, keys and frame sealing ----------------------------------------------------------


def _joined(label: bytes, *parts: bytes) -> bytes:
    """Length-prefix each part so no two different transcripts serialize to the same bytes."""
    out = bytearray(label)
    for part in parts:
        out += len(part).to_bytes(4, "big")
        out += part
    return bytes(out)


def _mac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, hashlib.sha256)


def _label(major: int, what: str) -> bytes:
    return f"butterfly-peer/{major} {what}".encode()


class FrameSealer:
    """Tags outgoing session frames: HMAC(key, seq | body), seq counting from 0 per direction."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def seal(self, body: bytes) -> bytes:
        mac = hmac.new(self._key, self._seq.to_bytes(8, "big"), hashlib.sha256)
        mac.update(body)
        self._seq += 1
        return mac.digest()


class FrameOpener:
    """Checks incoming session frames against the sequence number it expects next."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._seq = 0

    def open(self, frame: bytes) -> bytes:
        """The body of ``frame`` (body | tag); raises IntegrityError if the tag does not verify."""
        if len(frame) < MAC_BYTES:
            raise IntegrityError("frame shorter than its MAC")
        body, tag = frame[:-MAC_BYTES], frame[-MAC_BYTES:]
        mac = hmac.new(self._key, self._seq.to_bytes(8, "big"), hashlib.sha256)
        mac.update(body)
        if not hmac.compare_digest(mac.digest(), tag):
            raise IntegrityError(
                f"frame {self._seq} failed its MAC check (altered, replayed or out of order)"
            )
        self._seq += 1
        return body


@dataclass
class Session:
    """An authenticated connection's keys and what was learned about the peer. ``sealer``/``opener``
    are None on TLS sessions, where the TLS record layer protects the frames."""

    peer: PeerIdentity
    peer_version: tuple[int, int]
    version: tuple[int, int]
    sealer: FrameSealer | None
    opener: FrameOpener | None


def _session(
    secret: bytes,
    major: int,
    transcript: tuple[bytes, ...],
    *,
    is_client: bool,
    tls: bool,
    peer: PeerIdentity,
    peer_version: tuple[int, int],
    version: tuple[int, int],
) -> Session:
    negotiated = (major, min(version[1], peer_version[1]))
    if tls:
        return Session(peer, peer_version, negotiated, None, None)
    master = _mac(secret, _joined(_label(major, "session"), *transcript))
    c2s, s2c = _mac(master, b"client->server"), _mac(master, b"server->client")
    send, recv = (c2s, s2c) if is_client else (s2c, c2s)
    return Session(peer, peer_version, negotiated, FrameSealer(send), FrameOpener(recv))


# ---- the handshake -------------------------------------------------------------------------------


def _refuse(stream: FrameStream, code: str, reason: str, version: tuple[int, int]) -> None:
    # The peer's decoder caps reasons at 512 characters; a longer one would arrive as a garbled frame.
    stream.write(encode(Refusal(code, reason[:512], version[0], version[1])))


def _version_refusal(mine: tuple[int, int], theirs: tuple[int, int]) -> str:
    return (
        f"protocol version {theirs[0]}.{theirs[1]} is incompatible with this node's "
        f"{mine[0]}.{mine[1]} (major versions differ): run one Butterfly release across the cluster"
    )


async def _read(stream: FrameStream) -> tuple[bytes, HandshakeMessage]:
    raw = await stream.read(HANDSHAKE_MAX_FRAME)
    try:
        return raw, decode_handshake(raw)
    except FrameError as exc:
        raise HandshakeError(REFUSED_PROTOCOL, str(exc), by_peer=False) from None


def _wrong_proof(who: str, binding: bytes) -> str:
    relay = ", or a relay with its own TLS certificate sits between the two nodes" if binding else ""
    return f"the {who}'s proof is wrong: it does not hold this cluster's secret{relay}"


def _refused_by_peer(message: Refusal) -> HandshakeError:
    return HandshakeError(
        message.code, message.reason, by_peer=True, peer_version=(message.major, message.minor)
    )


async def client_handshake(
    stream: FrameStream,
    secret: bytes,
    identity: PeerIdentity,
    *,
    tls_binding: bytes | None = None,
    version: tuple[int, int] = PROTOCOL_VERSION,
) -> Session:
    """Run the dialer's side; ``tls_binding`` (see ``tls_binding``) when the stream is TLS. The caller
    applies its own admission checks to ``Session.peer`` afterwards (and says Goodbye on the session
    if it refuses)."""
    binding = tls_binding or b""
    hello_c = encode(ClientHello(version[0], version[1], secrets.token_bytes(NONCE_BYTES)))
    stream.write(hello_c)
    await stream.drain()
    hello_s, message = await _read(stream)
    if isinstance(message, Refusal):
        raise _refused_by_peer(message)
    if not isinstance(message, ServerHello):
        raise HandshakeError(
            REFUSED_PROTOCOL, f"expected server_hello, got {type(message).__name__}", by_peer=False
        )
    peer_version = (message.major, message.minor)
    if message.major != version[0]:
        reason = _version_refusal(version, peer_version)
        _refuse(stream, REFUSED_VERSION, reason, version)
        raise HandshakeError(REFUSED_VERSION, reason, by_peer=False, peer_version=peer_version)
    identity_c = encode(identity)
    mac_c = _mac(secret, _joined(_label(version[0], "client"), binding, hello_c, hello_s, identity_c))
    stream.write(encode(ClientProof(identity_c, mac_c)))
    await stream.drain()
    _, message = await _read(stream)
    if isinstance(message, Refusal):
        raise _refused_by_peer(message)
    if not isinstance(message, ServerProof):
        raise HandshakeError(
            REFUSED_PROTOCOL, f"expected server_proof, got {type(message).__name__}", by_peer=False
        )
    parts = (binding, hello_c, hello_s, identity_c, message.identity)
    expected = _mac(secret, _joined(_label(version[0], "server"), *parts))
    if not hmac.compare_digest(expected, message.mac):
        raise HandshakeError(
            REFUSED_AUTH, _wrong_proof("listener", binding), by_peer=False, peer_version=peer_version
        )
    try:
        peer = decode_identity(message.identity)
    except FrameError as exc:
        raise HandshakeError(REFUSED_PROTOCOL, str(exc), by_peer=False) from None
    return _session(
        secret,
        version[0],
        parts,
        is_client=True,
        tls=tls_binding is not None,
        peer=peer,
        peer_version=peer_version,
        version=version,
    )


async def server_handshake(
    stream: FrameStream,
    secret: bytes,
    identity: PeerIdentity,
    admit: Callable[[PeerIdentity], Verdict],
    *,
    tls_binding: bytes | None = None,
    version: tuple[int, int] = PROTOCOL_VERSION,
) -> Session:
    """Run the listener's side. ``admit`` sees the dialer's identity once its proof has checked out,
    before this node says who it is; a verdict is sent to the dialer as a Refusal."""
    binding = tls_binding or b""
    hello_c, message = await _read(stream)
    if not isinstance(message, ClientHello):
        raise HandshakeError(
            REFUSED_PROTOCOL, f"expected client_hello, got {type(message).__name__}", by_peer=False
        )
    peer_version = (message.major, message.minor)
    if message.major != version[0]:
        reason = _version_refusal(version, peer_version)
        _refuse(stream, REFUSED_VERSION, reason, version)
        raise HandshakeError(REFUSED_VERSION, reason, by_peer=False, peer_version=peer_version)
    hello_s = encode(ServerHello(version[0], version[1], secrets.token_bytes(NONCE_BYTES)))
    stream.write(hello_s)
    await stream.drain()
    _, message = await _read(stream)
    if isinstance(message, Refusal):
        raise _refused_by_peer(message)
    if not isinstance(message, ClientProof):
        raise HandshakeError(
            REFUSED_PROTOCOL, f"expected client_proof, got {type(message).__name__}", by_peer=False
        )
    expected = _mac(
        secret, _joined(_label(version[0], "client"), binding, hello_c, hello_s, message.identity)
    )
    if not hmac.compare_digest(expected, message.mac):
        _refuse(stream, REFUSED_AUTH, "authentication failed", version)
        reason = f"authentication failed: {_wrong_proof('dialer', binding)}"
        raise HandshakeError(REFUSED_AUTH, reason, by_peer=False, peer_version=peer_version)
    try:
        peer = decode_identity(message.identity)
    except FrameError as exc:
        raise HandshakeError(REFUSED_PROTOCOL, str(exc), by_peer=False) from None
    verdict = admit(peer)
    if verdict is not None:
        _refuse(stream, verdict[0], verdict[1], version)
        raise HandshakeError(verdict[0], verdict[1], by_peer=False, peer_version=peer_version, peer=peer)
    identity_s = encode(identity)
    parts = (binding, hello_c, hello_s, message.identity, identity_s)
    mac_s = _mac(secret, _joined(_label(version[0], "server"), *parts))
    stream.write(encode(ServerProof(identity_s, mac_s)))
    return _session(
        secret,
        version[0],
        parts,
        is_client=False,
        tls=tls_binding is not None,
        peer=peer,
        peer_version=peer_version,
        version=version,
    )
