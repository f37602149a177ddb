"""Stage links are authenticated with the cluster secret and encrypted.

A peer without the secret is refused (either side); a link of another plan epoch or an unexpected role
is refused with the reason; a frame altered, replayed or dropped on the wire ends the link (and the
requests on it get a 503, never a hang, never a wrong token); and nothing a user sent -- the prompt's
token ids, the activations -- crosses the wire in the clear. A relay between two stages parses the
length-prefixed frames so it can record, flip, replay or drop exactly one.
"""

from __future__ import annotations

import asyncio
import gc
import os
import struct
from collections.abc import Iterator

import msgspec
import pytest
import torch

from butterfly.engine.model import SeqChunk, StageModel
from butterfly.engine.sampler import SamplingParams
from butterfly.engine.weights import ModelDir, open_model_dir
from butterfly.serving import aead
from butterfly.serving.backend import GenerationRequest, ServingError
from butterfly.serving.client import EntryTarget, RemoteBackend
from butterfly.serving.link import (
    ROLE_CLIENT,
    ROLE_STAGE,
    Free,
    Hello,
    LinkClosed,
    LinkError,
    LinkRefused,
    Ping,
    accept_link,
    dial_link,
)
from butterfly.serving.stage import StageAddress, StageServer
from tests.asynchelpers import asyncio_whose_wait_for_drops_a_cancel
from tests.hfmodels import save_hf_model
from tests.servinghelpers import SECRET, collect, start_pipeline, stop_pipeline, wait_ready

torch.set_num_threads(1)
GREEDY = SamplingParams(temperature=0.0)
# A prompt whose msgpack form (one byte per id below 128) is a run no ciphertext shows by chance.
PROMPT = tuple(range(80, 95))


@pytest.fixture(scope="module")
def md(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelDir]:
    m = open_model_dir(save_hf_model("llama", tmp_path_factory.mktemp("llama") / "model"))
    yield m
    gc.collect()
    m.close()


class Relay:
    """Forwards frames between a dialer and ``upstream``, recording every byte both ways. ``fault``:
    ("flip" | "replay" | "drop", n) applies once, to the n-th frame the first dialer sends (0-based)."""

    def __init__(self, upstream_port: int, fault: tuple[str, int] | None = None) -> None:
        self.upstream_port = upstream_port
        self.fault = fault
        self.captured = bytearray()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, uw]
        await asyncio.gather(
            self._pump(reader, uw, self.fault), self._pump(ur, writer, None), return_exceptions=True
        )
        writer.close()
        uw.close()

    async def _pump(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, fault: tuple[str, int] | None
    ) -> None:
        n = 0
        last = b""
        while True:
            head = await r.readexactly(4)
            body = await r.readexactly(struct.unpack(">I", head)[0])
            frame = head + body
            self.captured += frame
            if fault is not None and n == fault[1] and self.fault is not None:
                self.fault = None  # once: a link dialed again passes untouched
                if fault[0] == "flip":
                    frame = frame[:-1] + bytes([frame[-1] ^ 1])
                elif fault[0] == "replay":
                    frame = last
                elif fault[0] == "drop":
                    frame = b""
            w.write(frame)
            await w.drain()
            last = head + body
            n += 1


def _admit_all(_hello: Hello) -> tuple[str, str] | None:
    return None


async def _listener(secret: bytes) -> tuple[asyncio.AbstractServer, asyncio.Queue[BaseException | object]]:
    results: asyncio.Queue[BaseException | object] = asyncio.Queue()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            link = await accept_link(r, w, secret, _admit_all)
            await results.put(link)
            while True:
                await results.put((await link.recv())[0])
        except LinkError as exc:
            await results.put(exc)
            w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), results


@pytest.mark.parametrize("size", [0, 1, 31, 32, 33, 1536, 49152, (1 << 20) + 7])
def test_in_place_sealing_is_libsodium_aegis128l_as_pynacl_publishes_it(size: int) -> None:
    """aead calls PyNaCl's cffi module directly, in place: what it seals must be what PyNaCl's public
    (copying) wrapper seals for the same key, nonce and data, and open the other's output."""
    import nacl.bindings as nb

    key, nonce, aad = os.urandom(aead.KEY_BYTES), os.urandom(aead.NONCE_BYTES), os.urandom(4)
    plain = os.urandom(size)
    buf = bytearray(plain + bytes(aead.TAG_BYTES))
    aead.Aegis128L(key).seal(buf, nonce, aad)
    assert bytes(buf) == nb.crypto_aead_aegis128l_encrypt(plain, aad, nonce, key)
    assert aead.Aegis128L(key).open(bytes(buf), nonce, aad) == plain
    assert nb.crypto_aead_aegis128l_decrypt(bytes(buf), aad, nonce, key) == plain


def test_a_sealed_frame_opens_only_unaltered_with_its_key_nonce_and_length() -> None:
    key, nonce, aad = os.urandom(aead.KEY_BYTES), os.urandom(aead.NONCE_BYTES), b"\0\0\1\0"
    c = aead.Aegis128L(key)
    buf = bytearray(os.urandom(200) + bytes(aead.TAG_BYTES))
    c.seal(buf, nonce, aad)
    sealed = bytes(buf)
    assert c.open(sealed, nonce, aad) is not None
    for i in (0, 100, 199, 200, len(sealed) - 1):  # ciphertext and tag
        bad = bytearray(sealed)
        bad[i] ^= 0x01
        assert c.open(bytes(bad), nonce, aad) is None, i
    assert c.open(sealed, (int.from_bytes(nonce, "big") ^ 1).to_bytes(aead.NONCE_BYTES, "big"), aad) is None
    assert c.open(sealed, nonce, b"\0\0\1\1") is None
    assert aead.Aegis128L(os.urandom(aead.KEY_BYTES)).open(sealed, nonce, aad) is None
    assert c.open(sealed[: aead.TAG_BYTES - 1], nonce, aad) is None  # shorter than a tag
    assert c.open(sealed[:-1], nonce, aad) is None  # truncated
    with pytest.raises(ValueError, match="16 bytes"):
        aead.Aegis128L(os.urandom(32))
    with pytest.raises(ValueError, match="room for the tag"):
        c.seal(bytearray(aead.TAG_BYTES - 1), nonce, aad)


def test_frames_of_every_size_cross_a_link_intact_and_in_order() -> None:
    """Tensor bytes from none to several MiB (a prefill chunk's activations) arrive as sent, each
    frame's header with its own tensor, both ways over the keys of one handshake."""
    sizes = [0, 1, 1536, 49152, 3 << 20]
    blobs = [os.urandom(n) for n in sizes]

    async def run() -> None:
        received: list[tuple[object, bytes]] = []

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peer = await accept_link(r, w, SECRET, _admit_all)
            for _ in sizes:
                msg, raw = await peer.recv()
                received.append((msg, bytes(raw)))
                await peer.send(msg, raw)

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        link = await dial_link(
            "127.0.0.1", server.sockets[0].getsockname()[1], SECRET, role=ROLE_STAGE, epoch=1, index=0
        )
        for i, blob in enumerate(blobs):
            await link.send(Free([i]), blob)
        back = [await asyncio.wait_for(link.recv(), 10) for _ in sizes]
        sent = [(Free([i]), b) for i, b in enumerate(blobs)]
        assert received == sent
        assert [(m, bytes(r)) for m, r in back] == sent
        link.close()
        server.close()

    asyncio.run(run())


def test_a_dialer_without_the_secret_is_refused() -> None:
    async def run() -> None:
        server, results = await _listener(SECRET)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(LinkRefused) as e:
            await dial_link("127.0.0.1", port, os.urandom(32), role=ROLE_STAGE, epoch=1, index=0)
        assert e.value.code == "auth" and e.value.by_peer
        refused = await results.get()
        assert isinstance(refused, LinkRefused) and refused.code == "auth"
        server.close()

    asyncio.run(run())


def test_a_listener_without_the_secret_is_not_trusted() -> None:
    async def run() -> None:
        server, _ = await _listener(os.urandom(32))
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(LinkRefused) as e:
            await dial_link("127.0.0.1", port, SECRET, role=ROLE_STAGE, epoch=1, index=0)
        # The listener refuses our proof; either way no session exists without the same secret.
        assert e.value.code == "auth"
        server.close()

    asyncio.run(run())


def test_wrong_epoch_and_role_are_refused_with_the_reason(md: ModelDir) -> None:
    async def run() -> None:
        servers = await start_pipeline(md, (0, 2, 4), epoch=7)
        try:
            port0, port1 = servers[0].listen_port, servers[1].listen_port
            with pytest.raises(LinkRefused) as e:
                await dial_link("127.0.0.1", port0, SECRET, role=ROLE_CLIENT, epoch=6, index=-1)
            assert e.value.code == "epoch" and "epoch 7" in e.value.reason
            with pytest.raises(LinkRefused) as e:
                await dial_link("127.0.0.1", port1, SECRET, role=ROLE_CLIENT, epoch=7, index=-1)
            assert e.value.code == "role" and "not the pipeline's entry" in e.value.reason
            with pytest.raises(LinkRefused) as e:
                await dial_link("127.0.0.1", port0, SECRET, role=ROLE_STAGE, epoch=7, index=0)
            assert e.value.code == "role"
            # The pipeline was never disturbed.
            toks, _ = await collect(servers[0], GenerationRequest((1, 2, 3), 4, GREEDY))
            assert len(toks) == 4
        finally:
            await stop_pipeline(servers)

    asyncio.run(run())


@pytest.mark.parametrize("fault", ["flip", "replay", "drop"])
def test_altered_replayed_or_dropped_frames_end_the_link(fault: str) -> None:
    async def run() -> None:
        server, results = await _listener(SECRET)
        relay = Relay(server.sockets[0].getsockname()[1], (fault, 4))  # frames 0-1 are the handshake
        port = await relay.start()
        link = await dial_link("127.0.0.1", port, SECRET, role=ROLE_STAGE, epoch=1, index=0)
        assert not isinstance(await results.get(), BaseException)
        for _ in range(6):
            await link.send(Ping())
        got = [await asyncio.wait_for(results.get(), 10) for _ in range(2)]
        assert got == [Ping(), Ping()]  # frames 2 and 3
        err = await asyncio.wait_for(results.get(), 10)
        assert isinstance(err, LinkError) and not isinstance(err, LinkClosed), err
        assert "failed authentication" in str(err)
        link.close()
        await relay.close()
        server.close()

    asyncio.run(run())


def test_nothing_a_user_sent_crosses_the_wire_in_the_clear(md: ModelDir) -> None:
    async def run() -> None:
        servers = []
        relays: list[Relay] = []
        try:
            models = [StageModel(md.config, md.weights, a, b, 4) for a, b in ((0, 2), (2, 4))]
            for i, m in enumerate(models):
                s = StageServer(m, index=i, epoch=1, secret=SECRET, kv_cache_bytes=16 << 20)
                await s.listen()
                servers.append(s)
            # Stage 0 dials stage 1 through a relay; the client dials stage 0 through another.
            relays = [Relay(servers[1].listen_port), Relay(servers[0].listen_port)]
            for r in relays:
                await r.start()
            addrs = [
                StageAddress(0, 0, 2, "127.0.0.1", servers[0].listen_port),
                StageAddress(1, 2, 4, "127.0.0.1", relays[0].port),
            ]
            for s in servers:
                s.start(addrs)
            await wait_ready(servers[0])
            backend = RemoteBackend(SECRET, lambda: EntryTarget("127.0.0.1", relays[1].port, 1))
            toks, _ = await collect(backend, GenerationRequest(PROMPT, 6, GREEDY))
            await backend.close()
            assert len(toks) == 6
            wire = bytes(relays[0].captured + relays[1].captured)
            assert len(wire) > 4096  # the prompt and its activations did cross
            assert msgspec.msgpack.encode(list(PROMPT))[1:] not in wire
            assert bytes(PROMPT) not in wire
            # Stage 0's activations for the prompt, as the bytes a plaintext frame would carry.
            cache = models[0].new_cache(1 << 20)
            cache.reserve(0, len(PROMPT))
            hidden = models[0].forward(torch.tensor(PROMPT), [SeqChunk(0, 0, len(PROMPT))], cache)
            raw = hidden.contiguous().view(torch.uint8).numpy().tobytes()
            for off in range(0, len(raw), 4096):
                assert raw[off : off + 16] not in wire
            # The generated tokens go back encrypted too (a run of six raw ids does not appear).
            assert bytes(toks) not in wire or len(set(toks)) == 1
        finally:
            for r in relays:
                await r.close()
            await stop_pipeline(servers)

    asyncio.run(run())


def test_a_tampered_stage_link_ends_requests_with_503_not_a_hang(md: ModelDir) -> None:
    async def run() -> None:
        servers = []
        relay: Relay | None = None
        try:
            for i, (a, b) in enumerate(((0, 2), (2, 4))):
                s = StageServer(
                    StageModel(md.config, md.weights, a, b, 4),
                    index=i,
                    epoch=1,
                    secret=SECRET,
                    kv_cache_bytes=16 << 20,
                )
                await s.listen()
                servers.append(s)
            # Frames 0-1 handshake, 2 the probe; 3 is the first step's activations.
            relay = Relay(servers[1].listen_port, ("flip", 3))
            await relay.start()
            addrs = [
                StageAddress(0, 0, 2, "127.0.0.1", servers[0].listen_port),
                StageAddress(1, 2, 4, "127.0.0.1", relay.port),
            ]
            for s in servers:
                s.start(addrs)
            await wait_ready(servers[0])
            with pytest.raises(ServingError) as e:
                await asyncio.wait_for(collect(servers[0], GenerationRequest(PROMPT, 6, GREEDY)), 60)
            assert e.value.status == 503 and "failed authentication" in e.value.message
            # The link is dialed again (the relay now passes frames untouched) and serving resumes.
            await wait_ready(servers[0], 60)
            toks, _ = await asyncio.wait_for(collect(servers[0], GenerationRequest(PROMPT, 6, GREEDY)), 60)
            assert len(toks) == 6
        finally:
            if relay is not None:
                await relay.close()
            await stop_pipeline(servers)

    asyncio.run(run())


async def _two_listening_stages(md: ModelDir) -> tuple[list[StageServer], list[StageAddress]]:
    """Stages [0, 2) and [2, 4) listening, not started."""
    servers = [
        StageServer(
            StageModel(md.config, md.weights, a, b, md.layout.num_blocks),
            index=i,
            epoch=1,
            secret=SECRET,
            kv_cache_bytes=16 << 20,
        )
        for i, (a, b) in enumerate(((0, 2), (2, 4)))
    ]
    for s in servers:
        await s.listen()
    addrs = [
        StageAddress(i, s.model.start, s.model.stop, "127.0.0.1", s.listen_port, f"n{i}")
        for i, s in enumerate(servers)
    ]
    return servers, addrs


def test_a_stage_closed_while_it_dials_keeps_no_link(md: ModelDir, monkeypatch: pytest.MonkeyPatch) -> None:
    # close() cancels the dial loop; when the handshake finishes in that same turn, Python 3.11's
    # wait_for returns the link and drops the cancellation. The stage used to adopt that link and
    # start its keepalive after close() had cancelled every task: a link outliving its stage.
    import butterfly.serving.link as link_module

    monkeypatch.setattr(link_module, "asyncio", asyncio_whose_wait_for_drops_a_cancel())
    client_handshake = link_module._client_handshake
    begun = []

    async def handshake_that_says_it_began(*args: object, **kwargs: object) -> object:
        if args[5] == 0:  # stage 0's dial
            begun[0].set()
        return await client_handshake(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(link_module, "_client_handshake", handshake_that_says_it_began)

    async def run() -> None:
        begun.append(asyncio.Event())
        servers, addrs = await _two_listening_stages(md)
        try:
            for s in servers:
                s.start(addrs)
            await asyncio.wait_for(begun[0].wait(), 5.0)
            await servers[0].close()
            assert servers[0].next is None
            assert not servers[0]._tasks, "tasks outlived close()"
        finally:
            await stop_pipeline(servers)

    asyncio.run(run())


def test_a_stage_closed_while_a_link_handshakes_with_it_keeps_no_link(
    md: ModelDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() aborts the links it knows; one whose handshake was in progress then was adopted as the
    # stage's upstream link afterwards and read on, after the stage had closed.
    import butterfly.serving.link as link_module

    server_handshake = link_module._server_handshake
    begun: list[asyncio.Event] = []
    release: list[asyncio.Event] = []

    async def handshake_held_until_close(*args: object, **kwargs: object) -> object:
        begun[0].set()
        await release[0].wait()
        return await server_handshake(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(link_module, "_server_handshake", handshake_held_until_close)

    async def run() -> None:
        begun.append(asyncio.Event())
        release.append(asyncio.Event())
        servers, addrs = await _two_listening_stages(md)
        try:
            for s in servers:  # each dials the other, whose side of the handshake is held
                s.start(addrs)
            await asyncio.wait_for(begun[0].wait(), 5.0)
            closing = asyncio.ensure_future(servers[1].close())
            await asyncio.sleep(0.1)
            release[0].set()
            await asyncio.wait_for(closing, 10.0)
            assert servers[1].prev is None, "a link was adopted after close()"
            assert not servers[1]._handlers, "a connection handler outlived close()"
        finally:
            await stop_pipeline(servers)

    asyncio.run(run())
