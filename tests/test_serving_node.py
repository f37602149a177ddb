"""Serving on real nodes: the engine child of each node serves its stage over the validated arena.

One node, and three nodes on 127.0.0.x: a request at the pipeline's entry gets the tokens the engine
computes over the model files directly; an engine child SIGKILLed or SIGSTOPped mid-request ends the
request with a 503 (never a hang) and the node serves again once the supervisor replaced it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib

from butterfly.engine.generate import Pipeline, generate
from butterfly.engine.model import StageModel
from butterfly.engine.sampler import SamplingParams
from butterfly.engine.weights import open_model_dir
from butterfly.net.auth import load_secret
from butterfly.serving.backend import GenerationRequest, ServingError, TokenEvent
from butterfly.serving.client import EntryTarget, RemoteBackend
from butterfly.serving.link import ROLE_CLIENT, LinkRefused, dial_link
from tests.clusterharness import Cluster
from tests.nodeharness import Node, free_port, segments_of, write_config
from tests.servinghelpers import collect
from tests.test_api_node import post

GREEDY = SamplingParams(temperature=0.0)
PROMPT = (5, 17, 300, 42, 7, 99, 123)
HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Iterator[list[int]]:
    md = open_model_dir(model_dir)
    pipe = Pipeline(
        [StageModel(md.config, md.weights, 0, md.layout.num_blocks, md.layout.num_blocks)], 16 << 20
    )
    yield generate(pipe, list(PROMPT), 12)
    del pipe
    gc.collect()
    md.close()


def engine_target(config: Path, epoch: int) -> EntryTarget:
    doc = tomllib.loads(config.read_text())
    host = doc["node"]["bind_address"].rsplit(":", 1)[0]
    return EntryTarget(host, int(doc["engine"]["port"]), epoch)


def engine_pid(status: dict[str, Any]) -> int:
    return next(c["pid"] for c in status["children"] if c["name"] == "engine")


async def _is_entry(t: EntryTarget, secret: bytes) -> bool:
    try:
        link = await dial_link(t.host, t.port, secret, role=ROLE_CLIENT, epoch=t.epoch, index=-1)
    except LinkRefused as e:
        assert e.code == "role", e
        return False
    link.close()
    return True


async def _fault_mid_request(backend: RemoteBackend, fault: Any) -> ServingError:
    got = 0
    with pytest.raises(ServingError) as err:
        async for ev in backend.generate(GenerationRequest(PROMPT, 400, GREEDY)):
            assert isinstance(ev, TokenEvent)
            got += 1
            if got == 2:
                fault()
    assert 2 <= got < 400
    return err.value


async def _serve_again(backend: RemoteBackend, want: list[int]) -> None:
    """Requests are refused (503) until the pipeline is back, then get the same tokens again."""
    loop = asyncio.get_running_loop()
    end = loop.time() + HANG_GUARD_S
    while True:
        try:
            toks, _ = await asyncio.wait_for(
                collect(backend, GenerationRequest(PROMPT, 12, GREEDY)), HANG_GUARD_S
            )
            assert toks == want
            return
        except ServingError as e:
            assert e.status == 503, e.message
            if loop.time() > end:
                raise
            await asyncio.sleep(0.2)


def test_one_node_serves_and_survives_its_engine_dying(
    tmp_path: Path, model_dir: Path, secret_file: Path, reference: list[int]
) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path / "node.toml", model_dir, node_id=f"s{port}", api_port=port, secret=secret_file
    )
    node = Node(cfg, port)
    try:
        st = node.wait_state("OPERATIONAL", 90)
        secret = load_secret(secret_file)
        target = engine_target(cfg, st["epoch"])

        async def run() -> None:
            backend = RemoteBackend(secret, lambda: target)
            try:
                toks, fin = await asyncio.wait_for(
                    collect(backend, GenerationRequest(PROMPT, 12, GREEDY)), HANG_GUARD_S
                )
                assert toks == reference and fin.completion_tokens == 12
                pid = engine_pid(node.status() or {})
                err = await asyncio.wait_for(
                    _fault_mid_request(backend, lambda: os.kill(pid, signal.SIGKILL)), HANG_GUARD_S
                )
                assert err.status == 503
                await _serve_again(backend, reference)
            finally:
                await backend.close()

        asyncio.run(run())
    finally:
        node.stop(signal.SIGTERM)
        for seg in segments_of(f"s{port}"):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def test_three_nodes_serve_and_a_frozen_stage_ends_the_request(
    tmp_path: Path, model_dir: Path, secret_file: Path, reference: list[int]
) -> None:
    c = Cluster(tmp_path, model_dir, secret_file, 3, quorum=3, heartbeat_timeout_s=20.0)
    try:
        c.start_all()
        st = c.wait_operational(120)
        epoch = next(iter(st.values()))["epoch"]
        secret = load_secret(secret_file)
        targets = {nid: engine_target(c.root / nid / "node.toml", epoch) for nid in c.ids}

        async def run() -> None:
            entries = [nid for nid, t in targets.items() if await _is_entry(t, secret)]
            assert len(entries) == 1, entries
            entry = entries[0]
            backend = RemoteBackend(secret, lambda: targets[entry])
            try:
                # OPERATIONAL everywhere; the stages' ring may still be forming (503 "forming" meanwhile).
                await _serve_again(backend, reference)
                # Any node's API serves: a node that is not the entry forwards to it.
                other = next(n for n in c.ids if n != entry)
                code, body = await asyncio.to_thread(
                    post,
                    c.nodes[other],
                    "/v1/completions",
                    {"prompt": "Hi", "max_tokens": 3, "temperature": 0},
                )
                assert code == 200 and body["usage"]["completion_tokens"] == 3, body
                # Freeze the engine of a node that is not the entry, mid-request.
                pid = engine_pid(c.nodes[other].status() or {})
                try:
                    err = await asyncio.wait_for(
                        _fault_mid_request(backend, lambda: os.kill(pid, signal.SIGSTOP)), HANG_GUARD_S
                    )
                    assert err.status == 503 and ("silent" in err.message or "lost" in err.message), (
                        err.message
                    )
                finally:
                    os.kill(pid, signal.SIGCONT)
                await _serve_again(backend, reference)
            finally:
                await backend.close()

        asyncio.run(run())
    finally:
        c.stop_all()


def test_a_restarted_cluster_child_waits_for_its_peers_engine_addresses_and_serves_again(
    tmp_path: Path, model_dir: Path, secret_file: Path
) -> None:
    # Regression: a worker whose cluster child was SIGKILLed got the plan from the log before any
    # peer's report said where its engine listens; the engine was started with an empty address and
    # the node failed for good. The plan now waits for every stage's address.
    c = Cluster(
        tmp_path,
        model_dir,
        secret_file,
        2,
        quorum=1,
        roles=["coordinator", "worker"],
        heartbeat_timeout_s=20.0,
    )
    try:
        c.start_all()
        c.wait_operational(120)
        worker = c.nodes[c.ids[1]]
        cluster_pid = next(ch["pid"] for ch in (worker.status() or {})["children"] if ch["name"] == "cluster")
        os.kill(cluster_pid, signal.SIGKILL)

        def restarted(st: dict[str, Any]) -> bool:
            kids = {ch["name"]: ch for ch in st[c.ids[1]]["children"]}
            return kids["cluster"]["pid"] != cluster_pid and kids["cluster"]["alive"]

        c.wait(restarted, 60, "the worker's cluster child restarted")
        end = time.monotonic() + 90
        while True:
            st = c.statuses()
            assert all(s is None or s["state"] != "FAILED" for s in st.values()), st
            code, body = post(worker, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
            if code == 200:
                assert body["usage"]["completion_tokens"] == 3, body
                break
            assert code == 503, body
            assert time.monotonic() < end, f"never served again: {body}; statuses {st}"
            time.sleep(0.3)
        assert all(s["state"] == "OPERATIONAL" for s in c.wait_operational(60).values())
    finally:
        c.stop_all()


def _hold_port(port: int, within_s: float = 10.0) -> socket.socket:
    """Listen on 127.0.0.1:``port`` as soon as it is free (its engine was just killed)."""
    end = time.monotonic() + within_s
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return s
        except OSError:
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.005)


@contextlib.contextmanager
def _node_with_holds(tmp_path: Path, model_dir: Path, extra: str = "") -> Iterator[tuple[Node, Path, Path]]:
    """A node that test holds (files in the holds folder) can stop at its hooks; (node, config, holds)."""
    port = free_port()
    holds = tmp_path / "holds"
    holds.mkdir()
    cfg = write_config(tmp_path / "node.toml", model_dir, node_id=f"s{port}", api_port=port, extra=extra)
    node = Node(cfg, port, env={"BUTTERFLY_TEST_HOLD_DIR": str(holds)})
    try:
        yield node, cfg, holds
    finally:
        node.stop(signal.SIGKILL)
        for seg in segments_of(f"s{port}"):
            Path("/dev/shm", seg).unlink(missing_ok=True)


@contextlib.contextmanager
def _engine_port_taken(
    tmp_path: Path, model_dir: Path, extra: str = ""
) -> Iterator[tuple[Node, socket.socket]]:
    """An operational node whose engine was SIGKILLed and whose engine port another process took before
    the engine could start again (a test hold keeps the engine from starting until then)."""
    with _node_with_holds(tmp_path, model_dir, extra) as (node, cfg, holds):
        st = node.wait_state("OPERATIONAL", 90)
        (holds / "hold-spawn-engine").touch()
        os.kill(engine_pid(st), signal.SIGKILL)
        taken = _hold_port(int(tomllib.loads(cfg.read_text())["engine"]["port"]))
        (holds / "hold-spawn-engine").unlink()
        with taken:
            yield node, taken


def test_an_engine_port_taken_for_a_moment_is_waited_out_without_reloading_the_weights(
    tmp_path: Path, model_dir: Path
) -> None:
    """Regression: one failed start of the stage (its port in use) reloaded the validated weights from
    the source, and a second one within the same plan failed the node for good, in under a second."""
    with _engine_port_taken(tmp_path, model_dir, extra="restart_limit = 10") as (node, taken):
        st = node.wait_for(
            lambda s: "address already in use" in (s["last_error"] or ""), what="a failed start"
        )
        assert st["phase"] == "ready" and node.get("/ready")[0] == 503
        taken.close()
        node.wait_ready()
        log = node.log()
        assert "starting the engine's stage again" in log
        assert "phase ready -> loading_weights" not in log  # the validated weights stayed in place
        assert log.count("load step download") == 1
        assert "still has views after the stage stopped" not in log  # the failed stage let go of the arena


def test_an_engine_port_taken_for_good_fails_the_node_naming_it_after_the_restart_budget(
    tmp_path: Path, model_dir: Path
) -> None:
    with _engine_port_taken(tmp_path, model_dir, extra="restart_limit = 2") as (node, _):
        st = node.wait_state("FAILED")
        assert "address already in use" in st["last_error"] and "3 times within 60s" in st["last_error"]
        log = node.log()
        assert log.count("starting the engine's stage again") == 2
        assert "phase ready -> loading_weights" not in log


def test_a_model_the_engine_cannot_run_fails_the_stage_for_good_not_for_a_retry() -> None:
    from butterfly.ipc import Loaded, StartEngine, TensorSpec
    from butterfly.serving.process import EngineError, build_stage

    loaded = Loaded(
        1, 0, 1, "arena", 0, [], [], {}, specs=[TensorSpec("w", "F16", [1])], model_config="[]",
        model_config_where="m/config.json",
    )  # fmt: skip
    with pytest.raises(EngineError) as e:
        build_stage(None, StartEngine(1, loaded, []))  # type: ignore[arg-type]  # never reached
    assert e.value.fatal and "m/config.json" in str(e.value) and "JSON object" in str(e.value)


def test_ready_never_says_200_between_an_engine_death_and_its_successor_serving(
    tmp_path: Path, model_dir: Path
) -> None:
    """Regression: once the supervisor had started the new engine it resumed serving_epoch, and the
    gate read the dead engine's board section (serving, its last beat under a second old) until the new
    engine's first write: /ready said 200 with no engine for up to a second."""
    with _node_with_holds(tmp_path, model_dir) as (node, _, holds):
        st = node.wait_state("OPERATIONAL", 90)
        (holds / "hold-engine-boot").touch()  # the new engine starts, but slowly
        victim = engine_pid(st)
        os.kill(victim, signal.SIGKILL)
        node.wait_for(lambda s: engine_pid(s) not in (None, victim), what="a new engine child")
        end = time.monotonic() + 2.0  # well past the dead engine's last beat going stale
        while time.monotonic() < end:
            code, body = node.get("/ready")
            assert code == 503, body
            time.sleep(0.01)
        assert b"engine child has not started" in body, body
        (holds / "hold-engine-boot").unlink()
        node.wait_ready()
