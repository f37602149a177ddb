"""Where weights come from: the ``Source`` contract, its errors, and ``open_source`` to build one from config.

Owns: the protocol every source implements (filesystem in ``filesystem.py``, S3 in ``s3.py``), the
``SourceError`` / ``SourceNotFound`` errors, the rule for which file names a source accepts, and choosing
the source from ``[model]`` / ``[loader]``.

Contract for every source:
- ``read_into(file, offset, buf)`` fills all of ``buf`` from ``file`` at ``offset`` or raises
  ``SourceError`` naming the file, offset and length; it never returns short and never reads outside
  ``[offset, offset + len(buf))``; a failure of one call leaves other calls (other ranges) unaffected;
- ``size(file)`` is the file's size in bytes; ``read_small(file, limit)`` the whole of a small file
  (config.json, the shard index, a manifest), refused when larger than ``limit``;
- a file that does not exist raises ``SourceNotFound`` (a ``SourceError``), so a caller can treat an
  absent optional file ("no manifest") differently from a failing store;
- every method may be called from several threads at once; ``close`` is called once, after the reads.

Must not: parse model files (``butterfly.weights`` does), hash or cache bytes (the loader and the cache do),
or import boto3 unless an S3 source is asked for (a filesystem-only node needs no AWS SDK).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from butterfly.config import Config

__all__ = [
    "FilesystemSource",
    "Source",
    "SourceError",
    "SourceNotFound",
    "check_file_name",
    "check_range",
    "open_source",
]


class SourceError(Exception):
    """A read failed; the message names the file (path or s3:// URL), offset and length where there is one."""


class SourceNotFound(SourceError):
    """The file (or the bucket holding it) does not exist."""


@runtime_checkable
class Source(Protocol):
    """Byte ranges of a model's files. See the module docstring for the contract."""

    @property
    def description(self) -> str:
        """Where the model lives (a directory or ``s3://bucket/prefix``), for messages."""
        ...

    def size(self, file: str) -> int: ...

    def read_into(self, file: str, offset: int, buf: memoryview) -> None: ...

    def read_small(self, file: str, limit: int) -> bytes: ...

    def close(self) -> None: ...


def check_file_name(file: str, where: str) -> None:
    """Refuse a name that could leave the model's directory or prefix (``..``, absolute, empty parts).

    Names come from the shard index, which is input: a source must not read ``../../etc/shadow`` or
    another model's prefix because an index said so.
    """
    parts = file.split("/")
    if (
        not file
        or file.startswith("/")
        or "\\" in file
        or "\x00" in file
        or any(p in ("", ".", "..") for p in parts)
        or PurePosixPath(file).is_absolute()
    ):
        raise SourceError(f"{where}: refusing file name {file!r} (must be a plain relative name)")


def check_range(where: str, offset: int, length: int) -> None:
    """Refuse a negative offset or length before it reaches a syscall or a Range header."""
    if offset < 0 or length < 0:
        raise SourceError(f"{where}: invalid range offset={offset} length={length}")


def open_source(config: Config) -> Source:
    """The source ``[model]`` names, with ``[loader]``'s concurrency and retries for S3."""
    model = config.model
    if model.source_type == "filesystem":
        return FilesystemSource(model.source_path)
    from butterfly.weights.sources.s3 import S3Source  # boto3 only when S3 is used

    return S3Source(
        model.source_path,
        endpoint_url=model.s3.endpoint_url,
        region=model.s3.region,
        path_style=model.s3.path_style,
        concurrency=config.loader.concurrency,
        retries=config.loader.retries,
    )


# Imported last: filesystem.py imports the errors above from this module.
from butterfly.weights.sources.filesystem import FilesystemSource  # noqa: E402
