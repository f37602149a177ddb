"""Finding the model version a node works on: the manifest named by [model], read through its source.

The manifest is the only source of truth for the model version (its Merkle root) and for the layer map
of a multi-node cluster; every node reads it itself, so a coordinator never has to be trusted for it.
This module must not read tensor data.
"""

from __future__ import annotations

from pathlib import Path

from butterfly.config import Config
from butterfly.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, decode_manifest, read_manifest
from butterfly.sources import Source, SourceNotFound, open_source


class NoManifest(Exception):
    """The model has no manifest yet; the message says how to make one."""


def load_manifest(config: Config) -> Manifest:
    model = config.model
    path = model.manifest_path
    if path is not None and not path.startswith("s3://"):
        try:
            return read_manifest(Path(path))
        except FileNotFoundError:
            raise NoManifest(f"manifest {path} does not exist") from None
    if path is not None:
        from butterfly.sources.s3 import S3Source, parse_s3_url

        bucket, key = parse_s3_url(path)
        prefix, _, name = key.rpartition("/")
        src: Source = S3Source(
            f"s3://{bucket}/{prefix}",
            endpoint_url=model.s3.endpoint_url,
            region=model.s3.region,
            path_style=model.s3.path_style,
        )
    else:
        src, name = open_source(config), MANIFEST_FILE
    try:
        raw = src.read_small(name, MAX_MANIFEST_BYTES)
    except SourceNotFound:
        raise NoManifest(
            f"no {name} at {src.description}: run `butterfly-admin manifest build MODEL_DIR` and publish it "
            "beside the weights"
        ) from None
    finally:
        src.close()
    return decode_manifest(raw, source=f"{src.description}/{name}")
