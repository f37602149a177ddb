"""The model version a node serves, as the API needs it: its id, manifest root and tokenizer.

Owns ``ServedModel`` and ``load_served_model``, which the supervisor calls (in a thread) once this
node's range is validated for an epoch: it reads the manifest as every node reads it (pins
included), refuses it unless its root is the epoch's (the root the coordinator checked this node's
weights against), and reads config.json and the tokenizer files through that manifest from the
weights' own source (``load_serving_tokenizer``), so the API never pairs these weights with another
version's tokenizer. Must not: run on the event loop (it does I/O) or know HTTP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from butterfly.api.tokenizer import ServingTokenizer, load_serving_tokenizer
from butterfly.config import Config
from butterfly.weights.modelsource import load_manifest
from butterfly.weights.sources import open_source

__all__ = ["ServedModel", "load_served_model", "model_id"]


@dataclass(frozen=True)
class ServedModel:
    """The model version this node serves: its id for clients, manifest root, tokenizer."""

    id: str
    root: str
    tokenizer: ServingTokenizer
    created: int = field(default_factory=lambda: int(time.time()))


def model_id(config: Config) -> str:
    """What clients call the model: the last part of ``[model] source_path`` (a directory or prefix)."""
    path = config.model.source_path.rstrip("/")
    return path.rsplit("/", 1)[-1] or path


class RootMismatch(ValueError):
    """The manifest read now is not the version the epoch's plan names."""


def load_served_model(config: Config, expected_root: str) -> ServedModel:
    """The served model for the epoch whose manifest root is ``expected_root``.

    Raises RootMismatch, or what ``load_manifest`` and ``load_serving_tokenizer`` raise (ManifestError,
    SourceError, TokenizerError...), each naming the file and why.
    """
    manifest = load_manifest(config)
    if manifest.merkle_root != expected_root:
        raise RootMismatch(
            f"the manifest now names model version {manifest.merkle_root}, the epoch's plan names "
            f"{expected_root}: the tokenizer is not loaded for another version"
        )
    src = open_source(config)
    try:
        tok = load_serving_tokenizer(manifest, src)
    finally:
        src.close()
    return ServedModel(model_id(config), manifest.merkle_root, tok)
