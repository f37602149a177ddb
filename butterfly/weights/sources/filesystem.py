"""A model in a local or mounted directory, read with ``pread`` straight into the caller's buffer.

Owns: one read-only descriptor per file (opened on first use, shared by every thread, since ``preadv``
takes its own offset), and the filesystem side of the ``Source`` contract.

Must not: follow a file name out of the model directory, read a non-regular file (a FIFO planted under
a model name would hang the read), or copy through an intermediate buffer.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from butterfly.weights.sources import SourceError, SourceNotFound, check_file_name, check_range

__all__ = ["FilesystemSource"]


class FilesystemSource:
    """``Source`` over a directory. ``model_dir()`` is kept for callers that still want the path."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    @property
    def description(self) -> str:
        return str(self.root)

    def _path(self, file: str) -> Path:
        check_file_name(file, str(self.root))
        return self.root / file

    def _fd(self, file: str) -> int:
        with self._lock:
            if self._closed:
                raise SourceError(f"{self.root}: source is closed")
            fd = self._fds.get(file)
            if fd is None:
                fd, size = self._open(file)
                self._fds[file] = fd
                self._sizes[file] = size
            return fd

    def _open(self, file: str) -> tuple[int, int]:
        path = self._path(file)
        try:
            # O_NONBLOCK: opening a FIFO must not block; it is refused below by its mode.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceNotFound(f"{path}: no such file") from None
        except OSError as e:
            raise SourceError(f"cannot open {path}: {e.strerror or e}") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SourceError(f"{path}: not a regular file")
        return fd, st.st_size

    def size(self, file: str) -> int:
        self._fd(file)
        with self._lock:
            return self._sizes[file]

    def read_into(self, file: str, offset: int, buf: memoryview) -> None:
        want = len(buf)
        check_range(str(self.root / file), offset, want)
        fd = self._fd(file)
        got = 0
        while got < want:
            try:
                n = os.preadv(fd, [buf[got:]], offset + got)
            except OSError as e:
                raise SourceError(
                    f"read of {self.root / file} range [{offset}, {offset + want}) failed at offset "
                    f"{offset + got}: {e}"
                ) from e
            if n == 0:
                raise SourceError(
                    f"{self.root / file} ended at offset {offset + got}, {want - got} bytes short of "
                    f"the range [{offset}, {offset + want})"
                )
            got += n

    def read_small(self, file: str, limit: int) -> bytes:
        # A fresh descriptor, not the cached one: small files are read once, and keeping config.json
        # open for the life of the source would hold a descriptor for nothing.
        fd, size = self._open(file)
        pieces: list[bytes] = []
        got = 0
        try:
            if size > limit:
                raise SourceError(f"{self.root / file}: {size} bytes, larger than the {limit}-byte limit")
            # Read to EOF but never past limit + 1: the file may have grown since fstat, and the limit
            # is on what we hold, not on what we saw.
            while got <= limit:
                piece = os.read(fd, limit + 1 - got)
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
        except OSError as e:
            raise SourceError(f"read of {self.root / file} failed: {e}") from e
        finally:
            os.close(fd)
        if got > limit:
            raise SourceError(f"{self.root / file}: larger than the {limit}-byte limit")
        return b"".join(pieces)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
