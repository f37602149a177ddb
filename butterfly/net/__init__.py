"""Node-to-node networking: the wire format (``frames``), authentication (``auth``), the connection
manager (``transport``) and its parts: one connection's life (``connection``), connection slots
(``slots``), bounds and counters (``limits``).

This package owns everything between a socket and "peer X sent these bytes on channel C". It must not
know what the bytes mean (Raft, capabilities and validation decode their own channels), find peers
(``butterfly.discovery`` does) or decide membership.
"""

from butterfly.net.auth import (
    HandshakeError,
    IntegrityError,
    SecretError,
    TlsConfigError,
    TlsContexts,
    generate_secret,
    load_secret,
    make_tls_contexts,
)
from butterfly.net.connection import Incoming, PeerEvent, PeerInfo
from butterfly.net.frames import (
    CHANNEL_CAPABILITY,
    CHANNEL_RAFT,
    CHANNEL_VALIDATION,
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameError,
    FrameTooLarge,
)
from butterfly.net.limits import TransportLimits, TransportStats
from butterfly.net.transport import Transport, default_advertise, transport_from_config

__all__ = [
    "CHANNEL_CAPABILITY",
    "CHANNEL_RAFT",
    "CHANNEL_VALIDATION",
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_VERSION",
    "FrameError",
    "FrameTooLarge",
    "HandshakeError",
    "Incoming",
    "IntegrityError",
    "PeerEvent",
    "PeerInfo",
    "SecretError",
    "TlsConfigError",
    "TlsContexts",
    "Transport",
    "TransportLimits",
    "TransportStats",
    "default_advertise",
    "generate_secret",
    "load_secret",
    "make_tls_contexts",
    "transport_from_config",
]
