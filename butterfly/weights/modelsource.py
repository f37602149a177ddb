"""Finding the model version a node works on: the manifest named by [model], read through its source.

The manifest is the only source of truth for the model version (its Merkle root) and for the layer map
of a multi-node cluster; every node reads it itself, so a coordinator never has to be trusted for it.
A manifest is used only if it reads back whole and consistent (``ManifestError`` otherwise) and passes
the operator's pins (``butterfly.weights.provenance``: the expected root, the signature; ``ManifestRefused``).
This module must not read tensor data.
"""

from __future__ import annotations

from pathlib import Path

from butterfly.config import Config
from butterfly.weights.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, decode_manifest
from butterfly.weights.provenance import MAX_SIGNATURE_BYTES, SIGNATURE_SUFFIX, check_pins
from butterfly.weights.sources import FilesystemSource, Source, SourceError, SourceNotFound, open_source
from butterfly.weights.verify import verified_model_config

__all__ = ["NoManifest", "load_manifest", "manifest_location"]


class NoManifest(Exception):
    """The model has no manifest yet; the message says how to make one."""


def manifest_location(config: Config) -> tuple[Source, str]:
    """The source holding the manifest and its name there; the caller closes the source."""
    model = config.model
    path = model.manifest_path
    if path is None:
        return open_source(config), MANIFEST_FILE
    if not path.startswith("s3://"):
        local = Path(path)
        return FilesystemSource(local.parent), local.name
    from butterfly.weights.sources.s3 import S3Source, parse_s3_url

    bucket, key = parse_s3_url(path)
    prefix, _, name = key.rpartition("/")
    src = S3Source(
        f"s3://{bucket}/{prefix}",
        endpoint_url=model.s3.endpoint_url,
        region=model.s3.region,
        path_style=model.s3.path_style,
    )
    return src, name


def load_manifest(config: Config) -> Manifest:
    """The manifest of [model], checked, and accepted by its pins.

    Raises ``NoManifest`` (none there), ``SourceError`` (the store failed), ``ManifestError`` (not a
    consistent manifest) or ``ManifestRefused`` (another version than pinned, or not signed as the
    config requires); each message names the manifest and what to do.
    """
    src, name = manifest_location(config)
    where = f"{src.description.rstrip('/')}/{name}"
    try:
        try:
            raw = src.read_small(name, MAX_MANIFEST_BYTES)
        except SourceNotFound:
            raise NoManifest(
                f"no manifest at {where}: run `butterfly-admin manifest build MODEL_DIR` and publish it "
                "beside the weights"
            ) from None
        signature = None
        if config.model.manifest_public_key is not None:
            try:
                signature = src.read_small(name + SIGNATURE_SUFFIX, MAX_SIGNATURE_BYTES)
            except SourceNotFound:
                signature = None
            except SourceError as e:
                raise SourceError(f"cannot read the manifest's signature: {e}") from e
    finally:
        src.close()
    manifest = decode_manifest(raw, source=where)
    check_pins(
        raw,
        manifest.merkle_root,
        signature,
        expected_root=config.model.expected_root,
        public_key=config.model.manifest_public_key,
        where=where,
    )
    # model_config is not bound by the root (only config.json's bytes are): it must be config.json as
    # fetched through the manifest, so a node never plans or runs with another version's config.
    src = open_source(config)
    try:
        verified_model_config(manifest, src)
    finally:
        src.close()
    return manifest
