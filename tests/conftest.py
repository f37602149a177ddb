"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama test model (4 blocks, 2 shards) shared by the end-to-end tests."""
    from butterfly.model.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "m", layers=4, hidden=128, vocab=512, shards=2)
