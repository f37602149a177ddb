"""A stage that dies or freezes mid-request ends the request with a clear 503, never a hang; the
pipeline forms again once the stage is back.

Stage 0 (the entry) runs in this process; stages 1 and 2 are processes of their own
(tests/stagerunner.py), SIGKILLed or SIGSTOPped while a request streams.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from butterfly.engine.model import StageModel
from butterfly.engine.sampler import SamplingParams
from butterfly.engine.weights import ModelDir, open_model_dir
from butterfly.serving.backend import GenerationRequest, ServingError, TokenEvent
from butterfly.serving.stage import StageAddress, StageServer
from butterfly.weights.layout import LayerRange
from tests.hfmodels import save_hf_model
from tests.nodeharness import free_port
from tests.servinghelpers import SECRET, collect, wait_ready

torch.set_num_threads(1)
CUTS = (0, 1, 3, 4)
# The hang guard of these tests: far above the failure-detection bound (SILENT_S), so only a real hang
# trips it. Not a timing assertion.
HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model("llama", tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture
def entry_model(model_dir: Path) -> Iterator[ModelDir]:
    md = open_model_dir(model_dir, LayerRange(0, 1))
    yield md
    # Views of the weights may sit in reference cycles (asyncio handles, logged exceptions) a moment.
    for _ in range(20):
        gc.collect()
        try:
            md.close()
            return
        except BufferError:
            time.sleep(0.1)
    md.close()


class Ring:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        ports = [free_port() for _ in CUTS[1:]]
        self.addrs = [
            StageAddress(i, a, b, "127.0.0.1", ports[i], f"n{i}")
            for i, (a, b) in enumerate(zip(CUTS, CUTS[1:], strict=False))
        ]
        self.procs: dict[int, subprocess.Popen[str]] = {}

    def spawn(self, index: int) -> None:
        stages = json.dumps([[a.index, a.start, a.stop, a.host, a.port] for a in self.addrs])
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.stagerunner",
                str(self.model_dir),
                str(index),
                "1",
                SECRET.hex(),
                stages,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        self.procs[index] = p

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


@pytest.fixture
def ring(model_dir: Path) -> Iterator[Ring]:
    r = Ring(model_dir)
    try:
        r.spawn(1)
        r.spawn(2)
        yield r
    finally:
        r.stop()


async def _entry(md: ModelDir, ring: Ring) -> StageServer:
    model = StageModel(md.config, md.weights, 0, 1, 4)
    srv = StageServer(
        model, index=0, epoch=1, secret=SECRET, kv_cache_bytes=16 << 20, listen_port=ring.addrs[0].port
    )
    await srv.listen()
    srv.start(ring.addrs)
    await wait_ready(srv)
    return srv


async def _stream_until_fault(srv: StageServer, fault: object) -> ServingError:
    """Stream a long request, apply ``fault()`` after its third token; the error that ends it."""
    req = GenerationRequest(tuple(range(1, 9)), 240, SamplingParams(temperature=0.0))
    got = 0
    with pytest.raises(ServingError) as err:
        async for ev in srv.generate(req):
            assert isinstance(ev, TokenEvent)
            got += 1
            if got == 3:
                fault()  # type: ignore[operator]
    assert 3 <= got < 240
    return err.value


@pytest.mark.parametrize("stage", [1, 2])
def test_killed_stage_ends_the_request_with_503(entry_model: ModelDir, ring: Ring, stage: int) -> None:
    async def run() -> None:
        srv = await _entry(entry_model, ring)
        try:
            err = await asyncio.wait_for(_stream_until_fault(srv, ring.procs[stage].kill), HANG_GUARD_S)
            assert err.status == 503 and err.code == "service_unavailable"
            assert "stage" in err.message, err.message
            # While the stage is down new requests are refused with the reason, at once.
            with pytest.raises(ServingError) as down:
                await asyncio.wait_for(collect(srv, GenerationRequest((1, 2), 3)), HANG_GUARD_S)
            assert down.value.status == 503
            # Back up: the ring forms again and serves.
            ring.procs[stage].wait()
            ring.spawn(stage)
            await wait_ready(srv, HANG_GUARD_S)
            toks, fin = await asyncio.wait_for(
                collect(srv, GenerationRequest((1, 2), 5, SamplingParams(temperature=0.0))), HANG_GUARD_S
            )
            assert len(toks) == 5 and fin.reason == "length"
        finally:
            await srv.close()

    asyncio.run(run())


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_stage_ends_the_request_with_503(entry_model: ModelDir, ring: Ring, stage: int) -> None:
    async def run() -> None:
        srv = await _entry(entry_model, ring)
        proc = ring.procs[stage]
        try:
            err = await asyncio.wait_for(
                _stream_until_fault(srv, lambda: proc.send_signal(signal.SIGSTOP)), HANG_GUARD_S
            )
            assert err.status == 503
            assert "silent" in err.message or "lost" in err.message, err.message
            # Thawed, the stage finds its links gone and the ring forms again.
            proc.send_signal(signal.SIGCONT)
            await wait_ready(srv, HANG_GUARD_S)
            toks, _ = await asyncio.wait_for(
                collect(srv, GenerationRequest((3, 4), 4, SamplingParams(temperature=0.0))), HANG_GUARD_S
            )
            assert len(toks) == 4
        finally:
            proc.send_signal(signal.SIGCONT)
            await srv.close()

    asyncio.run(run())
