"""What a node offers the cluster, and the exchange that tells every peer.

``Capabilities`` is the record the planner sizes a node by: identity and addresses, software and
protocol version, role, RAM (and the reserve kept off it), GPUs, CPU count, network bandwidth, free
cache space and the blocks already in the cache. ``local_capabilities`` builds this node's record from
the config and the detected hardware; ``CapabilityExchange`` sends it on the transport's
``"capability"`` channel whenever a peer comes up (and when it changes) and keeps the latest record of
each connected peer.

A peer's record is hostile input until decoded: every field has a bound, and a record whose node id
is not the authenticated sender's is dropped. This module must not plan (``butterfly.planner`` does),
scan the cache (the caller passes ``cached_blocks``) or touch the GPU (``butterfly.hardware`` found it).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from butterfly import __version__
from butterfly.config import Config
from butterfly.hardware import Hardware
from butterfly.net.connection import PeerEvent
from butterfly.net.frames import CHANNEL_CAPABILITY, PROTOCOL_VERSION, NodeIdText
from butterfly.net.transport import Transport, default_advertise

log = logging.getLogger("butterfly.capabilities")

Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
"""A byte count or index: never negative, and small enough that sums of a few thousand stay exact."""
Text = Annotated[str, msgspec.Meta(max_length=300)]
MAX_CACHED_BLOCKS = 1 << 20


class CapabilityError(ValueError):
    """A capability record that does not decode or breaks a bound."""


class GpuCapability(msgspec.Struct, frozen=True, array_like=True):
    name: Annotated[str, msgspec.Meta(max_length=128)]
    memory_bytes: Count


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """One node's offer. ``network_bandwidth_bps`` is 0 when unknown; ``cached_blocks`` is sorted."""

    node_id: NodeIdText
    cluster_name: Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
    addresses: Annotated[list[Text], msgspec.Meta(max_length=16)]
    version: Annotated[str, msgspec.Meta(max_length=64)]
    protocol: tuple[Count, Count]
    role: Literal["worker", "coordinator"]
    ram_bytes: Count
    memory_reserve_bytes: Count
    gpus: Annotated[list[GpuCapability], msgspec.Meta(max_length=64)]
    cpu_count: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
    network_bandwidth_bps: Count
    free_cache_bytes: Count
    cached_blocks: Annotated[list[Count], msgspec.Meta(max_length=MAX_CACHED_BLOCKS)]


_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Capabilities] = msgspec.msgpack.Decoder(Capabilities)


def encode_capabilities(caps: Capabilities) -> bytes:
    return _encoder.encode(caps)


def decode_capabilities(data: bytes) -> Capabilities:
    """Decode and check every bound; raises CapabilityError."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise CapabilityError(f"bad capability record: {exc}") from None


def link_speed_bps(sys_class_net: Path = Path("/sys/class/net")) -> int:
    """The fastest up, non-loopback network link's speed as the kernel reports it (bits/s), 0 if
    unknown (virtual links report -1 or nothing). A link rate, not a measured throughput."""
    best = 0
    try:
        interfaces = list(sys_class_net.iterdir())
    except OSError:
        return 0
    for interface in interfaces:
        if interface.name == "lo":
            continue
        try:
            if (interface / "operstate").read_text().strip() not in ("up", "unknown"):
                continue
            mbps = int((interface / "speed").read_text().strip())
        except (OSError, ValueError):
            continue
        best = max(best, mbps * 1_000_000)
    return best


def free_bytes(path: Path) -> int:
    """Free space for ``path``'s file system; a directory not made yet counts its nearest parent's."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def local_capabilities(
    config: Config,
    hardware: Hardware,
    cached_blocks: Iterable[int],
    *,
    bandwidth_bps: int | None = None,
) -> Capabilities:
    """This node's record. ``bandwidth_bps`` is a configured or measured rate; None reads the link
    speed (``link_speed_bps``)."""
    blocks = sorted(set(cached_blocks))
    if blocks and blocks[0] < 0:
        raise ValueError(f"negative cached block index {blocks[0]}")
    node = config.node
    advertise = node.advertise_address or default_advertise(node.bind_address)
    return Capabilities(
        node_id=node.id,
        cluster_name=config.cluster.cluster_name,
        addresses=[str(advertise)],
        version=__version__,
        protocol=PROTOCOL_VERSION,
        role=node.role,
        ram_bytes=hardware.memory_bytes,
        memory_reserve_bytes=node.memory_reserve_bytes,
        gpus=[GpuCapability(gpu.name, gpu.memory_bytes) for gpu in hardware.gpus],
        cpu_count=max(1, hardware.cpu_count or os.cpu_count() or 1),
        network_bandwidth_bps=link_speed_bps() if bandwidth_bps is None else bandwidth_bps,
        free_cache_bytes=free_bytes(node.cache_dir),
        cached_blocks=blocks,
    )


class CapabilityExchange:
    """Sends this node's record to each peer that comes up and keeps each connected peer's latest.

    Runs on the transport's event loop; listeners are called there for every accepted record."""

    def __init__(self, transport: Transport, local: Capabilities) -> None:
        self.transport = transport
        self.local = local
        self.rejected = 0
        self._known: dict[str, Capabilities] = {}
        self._listeners: list[Callable[[Capabilities], None]] = []
        self._encoded = encode_capabilities(local)
        transport.subscribe(CHANNEL_CAPABILITY, self._on_message)
        transport.add_peer_listener(self._on_peer)
        for peer_id in transport.peers():
            transport.send(peer_id, CHANNEL_CAPABILITY, self._encoded)

    def known(self) -> dict[str, Capabilities]:
        """Connected peers' latest records (a copy)."""
        return dict(self._known)

    def add_listener(self, listener: Callable[[Capabilities], None]) -> None:
        self._listeners.append(listener)

    def update(self, local: Capabilities) -> None:
        """This node's record changed (more blocks cached, cache space used): tell every peer."""
        self.local = local
        self._encoded = encode_capabilities(local)
        for peer_id in self.transport.peers():
            self.transport.send(peer_id, CHANNEL_CAPABILITY, self._encoded)

    def _on_peer(self, event: PeerEvent) -> None:
        if event.up:
            self.transport.send(event.peer.node_id, CHANNEL_CAPABILITY, self._encoded)
        else:
            self._known.pop(event.peer.node_id, None)

    def _on_message(self, peer_id: str, payload: bytes) -> None:
        try:
            caps = decode_capabilities(payload)
        except CapabilityError as exc:
            self.rejected += 1
            log.warning("ignored capabilities from node %s: %s", peer_id, exc)
            return
        if caps.node_id != peer_id or caps.cluster_name != self.local.cluster_name:
            self.rejected += 1
            log.warning(
                "ignored capabilities from node %s: they describe node %s of cluster %r",
                peer_id,
                caps.node_id,
                caps.cluster_name,
            )
            return
        self._known[peer_id] = caps
        for listener in list(self._listeners):
            listener(caps)
