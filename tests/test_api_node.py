"""The API in a real node: the supervisor loads the model's tokenizer through the manifest once its
range is validated, /v1/models names the model, and /v1 serves completions through the node's
inference pipeline."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.nodeharness import Node, free_port, segments_of, write_config


def post(node: Node, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        node.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_operational_node_loads_the_tokenizer_and_names_the_model(tmp_path: Path, model_dir: Path) -> None:
    port = free_port()
    node_id = f"t{os.getpid()}-api-{port}"
    cfg = write_config(tmp_path / "node.toml", model_dir, node_id=node_id, api_port=port)
    node = Node(cfg, port)
    try:
        st = node.wait_state("OPERATIONAL", timeout=90)

        def listed(_: dict[str, Any]) -> bool:
            code, body = node.get("/v1/models")
            return code == 200 and bool(json.loads(body)["data"])

        node.wait_for(listed, timeout=60, what="/v1/models to list the model")
        (model,) = json.loads(node.get("/v1/models")[1])["data"]
        assert model["id"] == model_dir.name and model["root"] == st["model_root"]
        assert (
            model["max_model_len"]
            == json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
        )
        assert "serving model" in node.log()
        code, body = post(node, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert code == 200, body
        assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length"
    finally:
        if node.proc.poll() is None:
            node.stop(signal.SIGTERM)
        for seg in segments_of(node_id):
            Path("/dev/shm", seg).unlink(missing_ok=True)


def test_tokenizer_is_only_loaded_for_the_epochs_version(tmp_path: Path) -> None:
    """A tokenizer.json that is not the manifest's (another version's beside these weights), or a
    manifest that is not the epoch's, is refused naming the file; the served model otherwise."""
    import shutil

    import pytest

    from butterfly.api.served import RootMismatch, load_served_model
    from butterfly.config import load_config
    from butterfly.weights.manifest import MANIFEST_FILE, ManifestError, read_manifest
    from butterfly.weights.testmodel import make_test_model

    model = make_test_model(tmp_path / "tiny", layers=1, hidden=32, heads=2, kv_heads=1, vocab=384, shards=1)
    root = read_manifest(model / MANIFEST_FILE).merkle_root
    cfg = load_config(write_config(tmp_path / "node.toml", model, node_id="n1", api_port=free_port()))
    served = load_served_model(cfg, root)
    assert served.id == "tiny" and served.root == root and served.tokenizer.encode("Hello")
    with pytest.raises(RootMismatch, match="another version"):
        load_served_model(cfg, "0" * 64)
    other = make_test_model(tmp_path / "other", layers=1, hidden=32, heads=2, kv_heads=1, vocab=400, shards=1)
    shutil.copy(other / "tokenizer.json", model / "tokenizer.json")
    with pytest.raises(ManifestError, match="tokenizer.json"):
        load_served_model(cfg, root)
