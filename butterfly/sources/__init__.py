"""Where weights come from. A source reads byte ranges of model files into caller-provided buffers.

Contract for every source (filesystem here; S3 and the cache arrive with the weights issue):
- `read_into(file, offset, buf)` fills all of `buf` from `file` at `offset` or raises SourceError;
  it never returns short and never reads outside the requested range;
- it may be called from several threads at once;
- `model_dir()` is a local directory holding the model's metadata files (config.json, headers).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class SourceError(Exception):
    """A read failed; the message names the file, offset and length."""


class FilesystemSource:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def model_dir(self) -> Path:
        return self.root

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                path = self.root / file
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise SourceError(f"cannot open {path}: {e.strerror}") from e
                self._fds[file] = fd
            return fd

    def read_into(self, file: str, offset: int, buf: memoryview) -> None:
        fd = self._fd(file)
        want = len(buf)
        got = 0
        while got < want:
            try:
                n = os.preadv(fd, [buf[got:]], offset + got)
            except OSError as e:
                raise SourceError(f"read of {self.root / file} at offset {offset + got} failed: {e}") from e
            if n == 0:
                raise SourceError(
                    f"{self.root / file} ended at offset {offset + got}, {want - got} bytes short of "
                    f"the range [{offset}, {offset + want})"
                )
            got += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
