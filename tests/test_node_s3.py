"""A node loading its weights from a real S3 endpoint (s3rver on loopback)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nodeharness import Node, free_port, segments_of, write_config
from tests.s3harness import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3rver, upload_dir

BUCKET = "models"


@pytest.fixture(scope="module")
def s3_with_model(model_dir: Path) -> Iterator[S3Server]:
    with running_s3rver((BUCKET,)) as server:
        upload_dir(server.client(), model_dir, BUCKET, "llama")
        yield server


def test_node_loads_only_from_s3_and_reaches_operational(
    s3_with_model: S3Server, tmp_path: Path, model_dir: Path
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "node.toml", model_dir, node_id=f"s3-{os.getpid()}", api_port=port)
    text = cfg.read_text().replace(
        'source_type = "filesystem"\nsource_path = "' + str(model_dir) + '"',
        f'source_type = "s3"\nsource_path = "s3://{BUCKET}/llama"\n\n[model.s3]\n'
        f'endpoint_url = "{s3_with_model.endpoint}"\nregion = "{REGION}"\npath_style = true',
    )
    assert "s3://" in text
    cfg.write_text(text)
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    node = Node(cfg, port, env=env)
    try:
        st = node.wait_state("OPERATIONAL", timeout=60)
        assert st["model_bytes_downloaded_total"] == st["bytes_total"] > 0
        assert f"from s3://{BUCKET}/llama" in node.log()
    finally:
        assert node.stop() == 0
        for seg in segments_of(f"s3-{os.getpid()}"):
            Path("/dev/shm", seg).unlink(missing_ok=True)
