"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama test model (4 blocks, 2 shards) with its manifest, shared by the end-to-end tests."""
    from butterfly.weights.build import build_manifest
    from butterfly.weights.manifest import MANIFEST_FILE, write_manifest
    from butterfly.weights.testmodel import make_test_model

    model = make_test_model(tmp_path_factory.mktemp("model") / "m", layers=4, hidden=128, vocab=512, shards=2)
    manifest, _ = build_manifest(model, chunk_bytes=64 * 1024)
    write_manifest(manifest, model / MANIFEST_FILE)
    return model


@pytest.fixture(scope="session")
def secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cluster secret for every node a test starts."""
    from butterfly.net.auth import generate_secret

    path = tmp_path_factory.mktemp("secret") / "cluster.key"
    generate_secret(path)
    return path
