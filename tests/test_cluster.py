"""Multi-node formation: real node processes on 127.0.0.1-7 forming one cluster."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from butterfly.weights.manifest import MANIFEST_FILE
from tests.clusterharness import Cluster


@pytest.fixture
def cluster_factory(tmp_path: Path, model_dir: Path, secret_file: Path):  # type: ignore[no-untyped-def]
    made: list[Cluster] = []

    def make(n: int, quorum: int, **kw) -> Cluster:  # type: ignore[no-untyped-def]
        c = Cluster(tmp_path, model_dir, secret_file, n, quorum=quorum, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_all()


def assert_formed(st: dict, model_dir: Path) -> None:  # type: ignore[type-arg]
    root = json.loads((model_dir / MANIFEST_FILE).read_text())["merkle_root"]
    coordinators = {s["coordinator"] for s in st.values()}
    terms = {s["term"] for s in st.values()}
    epochs = {s["epoch"] for s in st.values()}
    assert len(coordinators) == 1 and None not in coordinators, coordinators
    assert len(terms) == 1 and len(epochs) == 1, (terms, epochs)
    assert {s["model_root"] for s in st.values()} == {root}
    assert all(s["cluster_size"] == len(st) for s in st.values())
    total = sum(s["bytes_total"] for s in st.values())
    # Each node holds only its own blocks: together they hold the model about once, none holds it all.
    assert all(s["bytes_total"] < total for s in st.values())


def test_three_nodes_started_in_any_order_form_one_cluster(cluster_factory, model_dir) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3, quorum=3)
    c.start_all(order=[2, 0, 1])
    st = c.wait_operational()
    assert_formed(st, model_dir)
    for node in c.nodes.values():
        assert node.get("/ready")[0] == 200
    # The coordinator's log explains its decisions.
    coord = next(iter(st.values()))["coordinator"]
    assert (
        "coordinator: operational at epoch" in c.nodes[coord].log()
        or "proposing operational" in c.nodes[coord].log()
    )


def test_no_node_serves_before_the_operational_entry(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3, quorum=3)
    c.start(0)
    c.start(1)
    # Two of three cannot even bootstrap: nothing is loaded or served until the third arrives.
    c.wait(
        lambda st: all(
            s["state"] == "JOINING" and "found 2 of quorum_size 3" in (s["waiting_reason"] or "")
            for s in st.values()
        ),
        what="both nodes waiting for the third",
    )
    for node in c.nodes.values():
        assert node.get("/ready")[0] == 503
    c.start(2)
    c.wait_operational()


def test_a_node_with_the_wrong_secret_cannot_join(cluster_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from butterfly.net.auth import generate_secret

    c = cluster_factory(3, quorum=3)
    bad = tmp_path / "other.key"
    generate_secret(bad)
    c.start(0)
    c.start(1)
    c.secret = bad
    intruder = c.start(2)
    ids = c.ids
    st = c.wait(
        lambda st: (
            st[ids[2]]["cluster_size"] == 1
            and st[ids[0]]["cluster_size"] == 2
            and st[ids[1]]["cluster_size"] == 2
        ),
        what="the two honest nodes see each other and not the intruder",
    )
    assert all(s["phase"] == "discovery" for s in st.values())
    assert "refused" in c.nodes[ids[0]].log() or "refused" in intruder.log()


@pytest.mark.parametrize("phase", ["assignment", "loading_weights", "validation", "ready"])
def test_coordinator_sigkilled_in_any_phase_is_replaced_and_formation_completes(
    cluster_factory, tmp_path, phase
) -> None:  # type: ignore[no-untyped-def]
    hold = tmp_path / "holds"
    hold.mkdir()
    if phase != "ready":
        (hold / f"hold-{phase}").touch()
    c = cluster_factory(3, quorum=3, env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)})
    c.start_all()
    if phase == "ready":
        st = c.wait_operational()
    else:
        st = c.wait(
            lambda st: all(s["phase"] == phase and s["coordinator"] for s in st.values()),
            what=f"all in {phase}",
        )
    coord = next(iter(st.values()))["coordinator"]
    old_term = next(iter(st.values()))["term"]
    c.kill(coord)
    (hold / f"hold-{phase}").unlink(missing_ok=True)
    # Survivors that were serving keep serving until they miss their coordinator: wait for the new one.
    st = c.wait(
        lambda st: (
            all(s["state"] == "OPERATIONAL" and s["coordinator"] not in (None, coord) for s in st.values())
            and all(
                s["cluster_size"] == 2 and (phase == "assignment" or s["epoch"] >= 2) for s in st.values()
            )
        ),
        timeout=60,
        what="survivors operational under a new coordinator",
    )
    assert len(st) == 2
    assert_formed(st, Path(c.model))
    new = next(iter(st.values()))
    assert new["term"] > old_term
    if phase != "assignment":
        assert new["epoch"] >= 2  # re-planned for the survivors


def test_worker_killed_during_loading_replans_for_the_survivors(cluster_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hold = tmp_path / "holds"
    hold.mkdir()
    (hold / "hold-loading_weights").touch()
    c = cluster_factory(
        4,
        quorum=3,
        env={"BUTTERFLY_TEST_HOLD_DIR": str(hold)},
        roles=["coordinator", "coordinator", "coordinator", "worker"],
    )
    c.start_all()
    st = c.wait(
        lambda st: len(st) == 4 and all(s["phase"] == "loading_weights" for s in st.values()),
        what="all four loading",
    )
    c.kill(c.ids[3])
    (hold / "hold-loading_weights").unlink()
    st = c.wait_operational(timeout=60)
    assert len(st) == 3
    assert_formed(st, Path(c.model))


def serve_once(node, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    """A completion asked of ``node``; OPERATIONAL everywhere, the stages' ring may still be forming
    (503 meanwhile)."""
    from tests.test_api_node import post

    end = time.monotonic() + timeout
    while True:
        code, body = post(node, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        if code == 200 or time.monotonic() > end:
            break
        assert code == 503, body
        time.sleep(0.3)
    assert code == 200, body
    assert body["usage"]["completion_tokens"] == 3


def test_the_seeds_cluster_one_coordinator_and_workers_given_its_address_forms_and_serves(
    cluster_factory,
) -> None:  # type: ignore[no-untyped-def]
    """The seed's way to start a cluster, literally: its config (quorum_size = 3) on a coordinator
    started first, then workers with ``--seed-nodes coord:7000``. Before, the coordinator waited for
    three coordinator-eligible nodes for ever (the config check refused it outright); and with a
    quorum it could reach, the workers knew only the coordinator, so each waited in assignment for
    the other to say where its engine listens. Now the workers are the other voters (they vote, never
    stand), learn of each other from the coordinator's reports, and the cluster serves and rides out
    a lost worker."""
    c = cluster_factory(3, quorum=3, roles=["coordinator", "worker", "worker"], heartbeat_timeout_s=20.0)
    c.seeded_with = {0: [], 1: [0], 2: [0]}
    c.start_all()
    st = c.wait_operational(90)
    assert_formed(st, Path(c.model))
    assert {s["coordinator"] for s in st.values()} == {c.ids[0]}
    for i in (1, 2):
        log = c.nodes[c.ids[i]].log()
        assert f"dialing node {c.ids[3 - i]} at {c.addrs[3 - i]}: {c.ids[0]} is connected to it" in log
    serve_once(c.nodes[c.ids[2]])
    # Three voters: losing a worker leaves a majority, so the coordinator plans around it.
    c.kill(c.ids[2])
    st = c.wait(
        lambda st: all(s["state"] == "OPERATIONAL" and s["cluster_size"] == 2 for s in st.values()),
        60,
        "the two left OPERATIONAL",
    )
    serve_once(c.nodes[c.ids[1]])


def test_losing_quorum_waits_visibly(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    c = cluster_factory(3, quorum=3)
    c.start_all()
    c.wait_operational()
    c.kill(c.ids[1], signal.SIGKILL)
    c.kill(c.ids[2], signal.SIGKILL)
    st = c.wait(lambda st: all(s["state"] == "JOINING" for s in st.values()), what="survivor stops serving")
    (s,) = st.values()
    assert s["waiting_reason"]
    assert c.nodes[c.ids[0]].get("/ready")[0] == 503


def test_nodes_find_each_other_through_dns_srv(cluster_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.dnsmasq import Dnsmasq, SrvRecord

    c = cluster_factory(3, quorum=3)
    (tmp_path / "dns").mkdir()
    dns = Dnsmasq(tmp_path / "dns")
    srv = "_butterfly._tcp.butterfly.test"
    records, hosts = [], {}
    for i, addr in enumerate(c.addrs):
        host, port = addr.rsplit(":", 1)
        records.append(SrvRecord(f"n{i}.butterfly.test", int(port)))
        hosts[f"n{i}.butterfly.test"] = host
    dns.start({srv: records}, host_records=hosts)
    try:
        c.dns = (srv, f"127.0.0.1:{dns.port}")
        c.start_all()
        st = c.wait_operational()
        assert_formed(st, Path(c.model))
    finally:
        c.stop_all()
        dns.stop()


def odd_one_out(cluster_factory, model: Path):  # type: ignore[no-untyped-def]
    """Three nodes, the third a worker on ``model``; returns once it FAILED and the other two serve
    without it. It is a worker so that the coordinator is always one holding the reference model."""
    c = cluster_factory(3, quorum=2, roles=["coordinator", "coordinator", "worker"], heartbeat_timeout_s=30.0)
    c.models[2] = model
    c.start_all()
    odd = c.ids[2]
    st = c.wait(
        lambda st: (
            st[odd]["state"] == "FAILED"
            and all(st[n]["state"] == "OPERATIONAL" and st[n]["peer_faults"] for n in c.ids[:2])
        ),
        what="the odd node failed, the others serving without it",
    )
    return c, odd, st


def test_a_node_holding_another_model_version_fails_visibly_and_the_others_serve_around_it(
    cluster_factory, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from butterfly.weights.build import build_manifest
    from butterfly.weights.manifest import write_manifest
    from butterfly.weights.testmodel import make_test_model

    # Same architecture and names, other bytes (another seed): its own manifest is self-consistent.
    other = make_test_model(tmp_path / "other", layers=4, hidden=128, vocab=512, shards=2, seed=7)
    manifest, _ = build_manifest(other, chunk_bytes=64 * 1024)
    write_manifest(manifest, other / MANIFEST_FILE)
    c, odd, st = odd_one_out(cluster_factory, other)
    root = json.loads((Path(c.model) / MANIFEST_FILE).read_text())["merkle_root"]
    assert f"this node's manifest names model version {manifest.merkle_root}" in st[odd]["last_error"]
    assert f"the cluster's plan (epoch 1) is for {root}" in st[odd]["last_error"]
    assert c.nodes[odd].get("/ready")[0] == 503
    for n in c.ids[:2]:
        (fault,) = st[n]["peer_faults"]
        assert fault == {"node_id": odd, "layers": None, "failed": True, "reason": st[odd]["last_error"]}
        assert st[n]["epoch"] >= 2 and st[n]["model_root"] == root  # re-planned around it
        assert c.nodes[n].get("/ready")[0] == 200
    assert sum(st[n]["bytes_total"] for n in c.ids[:2]) > 0


def test_a_node_failing_validation_is_named_with_its_layers_and_planned_around(
    cluster_factory, tmp_path, model_dir
) -> None:  # type: ignore[no-untyped-def]
    from tests.tamper import copy_model, tamper_with_cheap_digests

    # Bytes changed in every unit, with the manifest's chunk and file digests rewritten to match: its
    # root is the cluster's, so it is planned for and loads, and only validation can tell.
    bad = copy_model(model_dir, tmp_path / "bad")
    for name in ["model.embed_tokens.weight", "lm_head.weight"] + [
        f"model.layers.{b}.mlp.up_proj.weight" for b in range(4)
    ]:
        tamper_with_cheap_digests(bad, name)
    c, odd, st = odd_one_out(cluster_factory, bad)
    reason = st[odd]["last_error"]
    assert "are not the model's" in reason and "the whole-tensor digest does not" in reason
    for n in c.ids[:2]:
        (fault,) = st[n]["peer_faults"]
        assert fault["node_id"] == odd and fault["failed"] and fault["reason"] == reason
        assert fault["layers"] is not None and re.fullmatch(r"\d+-\d+", fault["layers"])
        assert st[n]["epoch"] >= 2
    assert c.nodes[odd].get("/ready")[0] == 503


def test_peers_heard_of_skips_bad_addresses_and_this_node() -> None:
    from butterfly.cluster.messages import MAX_PEERS, NodeReport, decode_peer, encode
    from butterfly.cluster.process import peers_heard_of
    from butterfly.config import HostPort

    def report(node_id: str, peers: tuple[tuple[str, str], ...]) -> NodeReport:
        return NodeReport(node_id, "c", "worker", 1, 1.0, peers=peers)

    heard, bad = peers_heard_of(
        [
            report("me", (("x", "10.0.0.9:7000"),)),  # our own report: peers we reach already
            report("a", (("me", "10.0.0.1:7000"), ("b", "10.0.0.2:7000"), ("c", "not an address"))),
            report("b", (("a", "[::1]:7001"), ("d", "10.0.0.4:99999"))),
        ],
        "me",
    )
    assert heard == {HostPort("10.0.0.2", 7000): ("b", "a"), HostPort("::1", 7001): ("a", "b")}
    assert len(bad) == 2
    assert "a names peer c at 'not an address', which is not host:port" in bad[0]
    assert "b names peer d at '10.0.0.4:99999'" in bad[1]
    # A report naming more peers than any cluster has is malformed as a whole.
    many = tuple((f"n{i}", f"10.0.{i // 250}.{i % 250}:7000") for i in range(MAX_PEERS + 1))
    with pytest.raises(Exception, match="length"):
        decode_peer(encode(report("a", many)))
    assert decode_peer(encode(report("a", many[:MAX_PEERS]))).peers == many[:MAX_PEERS]
