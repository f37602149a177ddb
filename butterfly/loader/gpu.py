"""The GPU path of the loader: arena -> device on several CUDA streams, checked by a checksum kernel.

Owns:
- the upload: the arena is page-locked in place (cudaHostRegister) so that each chunk is one async
  host-to-device copy straight from it, round-robin over several streams; where registering fails,
  chunks go through a ring of pinned staging buffers (cupy.cuda.alloc_pinned_memory) instead.
  ``GpuUploader.submit`` takes a chunk as soon as it lands (``stream_into(on_chunk=...)``), so chunk N
  uploads while chunk N+1 is read;
- the upload check: ``checksum_host`` defines a 64-bit checksum (below); the NVRTC-compiled kernel
  ``bf_checksum`` computes the same function over the device bytes, and every tensor's two values must
  agree;
- the warmup: the engine's forward pass (butterfly.loader.warmup) over torch views of the device
  copies (DLPack, no copy), in the stored dtype.

The checksum: the bytes, zero-padded to a multiple of 4, read as little-endian u32 words w[i];
    checksum = sum over i of w[i] * (2*i + 1)   (mod 2**64).
A sum is order-free, so the GPU's reduction order cannot change it; the odd weights make a moved or
swapped word change it, and every weight is invertible mod 2**64, so any single changed word does too.

cupy is imported only inside the functions that need a GPU, never at module import: the CPU path
imports this module (for ``gpu_available``) and must not pay for, or break on, a CUDA install. This
module must not touch the board or keep the arena registered or referenced after ``close``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import mmap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import torch

from butterfly.loader.warmup import WarmupStats, warmup_weights

if TYPE_CHECKING:
    import cupy

__all__ = [
    "GpuUploadResult",
    "GpuUploader",
    "GpuVerifyError",
    "Placement",
    "device_weights",
    "dlpack_view",
    "checksum_host",
    "compile_kernels",
    "gpu_available",
    "gpu_warmup",
    "upload_and_verify",
]

HostBuffer = bytes | bytearray | memoryview | mmap.mmap
_MASK = (1 << 64) - 1
# Words per numpy step in checksum_host: bounds its temporaries to ~64 MiB whatever the tensor size.
_HOST_STEP_WORDS = 1 << 22
_BLOCK = 256
# Copies in flight: more streams than copy engines buys nothing, fewer leaves one idle between chunks.
DEFAULT_STREAMS = 4
STAGING_SLOT_BYTES = 16 << 20

_CHECKSUM_SRC = r"""
// The checksum of checksum_host (butterfly/loader/gpu.py): sum of w[i] * (2i + 1) mod 2^64 over the
// u32 words. Each thread sums a grid-stride slice; warps reduce with shuffles, blocks with one atomic.
extern "C" __global__ void bf_checksum(const unsigned int* __restrict__ words,
                                       unsigned long long n_words,
                                       unsigned long long* __restrict__ out) {
    unsigned long long acc = 0ull;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_words;
         i += stride) {
        acc += (unsigned long long)words[i] * (2ull * i + 1ull);
    }
    for (int off = 16; off > 0; off >>= 1) {
        acc += __shfl_down_sync(0xffffffffu, acc, off);
    }
    __shared__ unsigned long long warp_sums[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        warp_sums[warp] = acc;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = (blockDim.x + 31) >> 5;
        acc = lane < n_warps ? warp_sums[lane] : 0ull;
        for (int off = 16; off > 0; off >>= 1) {
            acc += __shfl_down_sync(0xffffffffu, acc, off);
        }
        if (lane == 0) {
            atomicAdd(out, acc);
        }
    }
}
"""


class GpuVerifyError(Exception):
    """A tensor's bytes on the device differ from the arena's (its two checksums disagree)."""


class Placement(Protocol):
    """Where a tensor lies in the arena (``butterfly.ipc.TensorPlacement`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def arena_offset(self) -> int: ...
    @property
    def length(self) -> int: ...


class TensorSpec(Protocol):
    """What the engine needs of a tensor (``butterfly.weights.layout.TensorEntry`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass
class GpuUploadResult:
    device: int
    tensors: dict[str, cupy.ndarray]
    """Device bytes (uint8, padded to 4 with zeros) per tensor name; the warmup and serving use these."""
    checksums: dict[str, int]
    bytes_uploaded: int
    seconds: float
    registered: bool
    """The arena was page-locked in place (else the pinned staging ring was used)."""


# --- the checksum, host side -------------------------------------------------------------------------------


def checksum_host(data: HostBuffer, first_word: int = 0) -> int:
    """The checksum of ``data`` (see the module docstring), its first word numbered ``first_word``:
    a tensor's checksum is the sum mod 2**64 of its chunks' checksums when each chunk (of a length
    divisible by 4) passes its own first word index."""
    with memoryview(data) as raw, raw.cast("B") as mv:
        n = len(mv)
        full = n // 4
        words = np.frombuffer(mv, dtype="<u4", count=full)
        acc = 0
        for s in range(0, full, _HOST_STEP_WORDS):
            w = words[s : s + _HOST_STEP_WORDS].astype(np.uint64)
            weights = np.arange(first_word + s, first_word + s + len(w), dtype=np.uint64)
            weights *= np.uint64(2)
            weights += np.uint64(1)
            # uint64 array arithmetic wraps mod 2**64, which is exactly the checksum's arithmetic.
            w *= weights
            acc = (acc + int(w.sum(dtype=np.uint64))) & _MASK
        del words
        if n % 4:
            tail = int.from_bytes(bytes(mv[full * 4 :]) + b"\0" * (4 - n % 4), "little")
            acc = (acc + tail * (2 * (first_word + full) + 1)) & _MASK
    return acc


# --- plumbing that needs no GPU (tested on the CPU) ---------------------------------------------------------


def padded(length: int) -> int:
    """Device bytes for a tensor: its length rounded up to whole u32 words (at least one)."""
    return max(4, (length + 3) // 4 * 4)


class _Index:
    """Finds the placement that holds an arena range (placements sorted by offset, not overlapping)."""

    def __init__(self, placements: Sequence[Placement]) -> None:
        self.by_offset = sorted(placements, key=lambda p: p.arena_offset)
        self.starts = [p.arena_offset for p in self.by_offset]

    def locate(self, arena_offset: int, length: int) -> tuple[Placement, int]:
        """The placement holding [arena_offset, + length) and the range's offset inside it."""
        k = bisect.bisect_right(self.starts, arena_offset) - 1
        if k >= 0:
            p = self.by_offset[k]
            inside = arena_offset - p.arena_offset
            if inside + length <= p.length:
                return p, inside
        raise ValueError(f"arena range [{arena_offset}, {arena_offset + length}) is not inside one tensor")


def pieces(offset: int, length: int, piece_bytes: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most ``piece_bytes`` covering [offset, offset + length)."""
    for off in range(offset, offset + length, piece_bytes):
        yield off, min(piece_bytes, offset + length - off)


# --- CuPy ---------------------------------------------------------------------------------------------------


def _cupy() -> ModuleType:
    import cupy

    return cupy


@functools.cache
def gpu_available() -> bool:
    """True if cupy imports and sees at least one CUDA device. Never raises."""
    try:
        return int(_cupy().cuda.runtime.getDeviceCount()) > 0
    except Exception:  # not installed, no driver, a broken CUDA install: all mean the CPU path
        return False


@functools.cache
def _checksum_kernel() -> cupy.RawKernel:
    cp = _cupy()
    return cp.RawKernel(_CHECKSUM_SRC, "bf_checksum", options=("-std=c++11",))


def compile_kernels(device: int = 0) -> float:
    """Compile (NVRTC) and load the loader's kernels on ``device`` now, so that neither the first
    upload nor the first request pays for it; returns the seconds it took."""
    cp = _cupy()
    t0 = time.monotonic()
    with cp.cuda.Device(device):
        kernel = _checksum_kernel()
        compile_now: Callable[[], object] | None = getattr(kernel, "compile", None)
        if compile_now is not None:
            compile_now()
        else:  # CuPy < 10: reading an attribute forces the compile and the module load
            _ = kernel.attributes
    return time.monotonic() - t0


def checksum_device(words_u8: cupy.ndarray, stream: cupy.cuda.Stream | None = None) -> cupy.ndarray:
    """Launch the checksum over a device uint8 array whose size is a multiple of 4; returns a 1-element
    uint64 device array (read it after the stream synchronizes)."""
    cp = _cupy()
    n_words = words_u8.size // 4
    blocks = max(1, min((n_words + _BLOCK - 1) // _BLOCK, 4096))
    kernel = _checksum_kernel()
    # The accumulator is zeroed on the same stream as the kernel that adds into it: on another stream
    # (a non-blocking one does not wait for the default stream) the zeroing could land after the sums.
    with stream if stream is not None else contextlib.nullcontext():
        out = cp.zeros(1, dtype=cp.uint64)
        kernel((blocks,), (_BLOCK,), (words_u8, np.uint64(n_words), out))
    return out


class GpuUploader:
    """Uploads chunks of the arena to per-tensor device buffers as they land; ``finish`` verifies.

    Call it from one thread (the streamer runs ``on_chunk`` on its calling thread). ``close`` (or
    leaving the ``with``) waits for pending copies, unregisters the arena and drops every reference to
    it, success or not: the arena's owner can then unmap it."""

    def __init__(
        self,
        arena: HostBuffer,
        placements: Sequence[Placement],
        device: int = 0,
        streams: int = DEFAULT_STREAMS,
        register: bool = True,
    ) -> None:
        cp = _cupy()
        self.cp = cp
        self.device = device
        self.index = _Index(placements)
        self._device = cp.cuda.Device(device)
        # Holds the arena's buffer export until close(): the pointer below stays valid that long.
        self._host: npt.NDArray[np.uint8] | None = np.frombuffer(arena, dtype=np.uint8)
        self._host_ptr = int(self._host.ctypes.data)
        self.registered = False
        self.streams: list[cupy.cuda.Stream] = []
        self._next_stream = 0
        # Staging ring (only when the arena could not be registered): pinned view, its memory, and the
        # event of the last copy out of it.
        self._slots: list[tuple[npt.NDArray[np.uint8], object, cupy.cuda.Event | None]] = []
        self._next_slot = 0
        self.bytes_uploaded = 0
        self.t0 = time.monotonic()
        self.buffers: dict[str, cupy.ndarray] = {}
        try:
            with self._device:
                self.streams = [cp.cuda.Stream(non_blocking=True) for _ in range(max(1, streams))]
                for p in placements:
                    buf = cp.empty(padded(p.length), dtype=cp.uint8)
                    # The pad bytes are part of the checksum's last word: zero, as on the host.
                    buf[p.length :] = 0
                    self.buffers[p.name] = buf
                # Those zeroing kernels ran on the default stream, which the non-blocking upload and
                # checksum streams do not wait for.
                cp.cuda.Stream.null.synchronize()
                if register and self._host.size:
                    try:
                        # Page-locked in place, every chunk is one DMA straight from the arena.
                        cp.cuda.runtime.hostRegister(self._host_ptr, int(self._host.size), 0)
                        self.registered = True
                    except Exception:  # a mapping the driver refuses: use the staging ring instead
                        self.registered = False
                if not self.registered:
                    for _ in range(len(self.streams)):
                        mem = cp.cuda.alloc_pinned_memory(STAGING_SLOT_BYTES)
                        view = np.frombuffer(mem, dtype=np.uint8, count=STAGING_SLOT_BYTES)
                        self._slots.append((view, mem, None))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> GpuUploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stream(self) -> cupy.cuda.Stream:
        s = self.streams[self._next_stream]
        self._next_stream = (self._next_stream + 1) % len(self.streams)
        return s

    def submit(self, arena_offset: int, length: int) -> None:
        """Queue the upload of arena bytes [arena_offset, + length), which must lie inside one tensor
        and must not change until ``finish``."""
        cp = self.cp
        host = self._host
        if host is None:
            raise ValueError("uploader is closed")
        p, inside = self.index.locate(arena_offset, length)
        if arena_offset + length > host.size:
            raise ValueError(f"arena range [{arena_offset}, {arena_offset + length}) is past the arena")
        dst = int(self.buffers[p.name].data.ptr) + inside
        h2d = cp.cuda.runtime.memcpyHostToDevice
        with self._device:
            if self.registered:
                stream = self._stream()
                cp.cuda.runtime.memcpyAsync(dst, self._host_ptr + arena_offset, length, h2d, stream.ptr)
            else:
                for off, n in pieces(arena_offset, length, STAGING_SLOT_BYTES):
                    view, mem, event = self._slots[self._next_slot]
                    if event is not None:
                        event.synchronize()  # the slot's previous copy must be done before we refill it
                    view[:n] = host[off : off + n]
                    stream = self._stream()
                    src = int(view.ctypes.data)
                    cp.cuda.runtime.memcpyAsync(dst + (off - arena_offset), src, n, h2d, stream.ptr)
                    done = cp.cuda.Event(block=False, disable_timing=True)
                    done.record(stream)
                    self._slots[self._next_slot] = (view, mem, done)
                    self._next_slot = (self._next_slot + 1) % len(self._slots)
        self.bytes_uploaded += length

    def finish(self, placements: Sequence[Placement], host_threads: int = 4) -> GpuUploadResult:
        """Wait for every copy, checksum every tensor on the device and on the host, and compare."""
        host = self._host
        if host is None:
            raise ValueError("uploader is closed")
        with self._device:
            for s in self.streams:
                s.synchronize()
            stream = self.streams[0]
            dev = {p.name: checksum_device(self.buffers[p.name], stream) for p in placements}

            def host_sum(p: Placement) -> int:
                return checksum_host(host[p.arena_offset : p.arena_offset + p.length].data)

            # numpy releases the GIL in the word arithmetic, so the host checksums run in parallel with
            # each other and with the kernels on the device.
            with ThreadPoolExecutor(max_workers=max(1, host_threads)) as pool:
                want = dict(zip([p.name for p in placements], pool.map(host_sum, placements), strict=True))
            stream.synchronize()
            got = {name: int(v.get()[0]) for name, v in dev.items()}
        for p in placements:
            if got[p.name] != want[p.name]:
                raise GpuVerifyError(
                    f"tensor {p.name} (arena offset {p.arena_offset}, {p.length} bytes) differs on GPU "
                    f"{self.device}: device checksum {got[p.name]:016x}, host {want[p.name]:016x}"
                )
        return GpuUploadResult(
            device=self.device,
            tensors=dict(self.buffers),
            checksums=got,
            bytes_uploaded=self.bytes_uploaded,
            seconds=time.monotonic() - self.t0,
            registered=self.registered,
        )

    def close(self) -> None:
        """Wait for pending copies, unregister the arena and drop the references to it. Idempotent."""
        if self._host is None:
            return
        with self._device:
            with contextlib.suppress(Exception):
                for s in self.streams:
                    s.synchronize()
            if self.registered:
                with contextlib.suppress(Exception):
                    self.cp.cuda.runtime.hostUnregister(self._host_ptr)
                self.registered = False
        self._slots.clear()
        self._host = None


def upload_and_verify(
    arena: HostBuffer,
    placements: Sequence[Placement],
    device: int = 0,
    chunk_bytes: int = 8 << 20,
    streams: int = DEFAULT_STREAMS,
) -> GpuUploadResult:
    """Upload every placement's bytes from the arena to ``device`` and verify them (see GpuUploader;
    the loader overlaps the same uploads with its reads through ``stream_into(on_chunk=...)``)."""
    with GpuUploader(arena, placements, device, streams) as up:
        for p in placements:
            for off, n in pieces(p.arena_offset, p.length, chunk_bytes):
                up.submit(off, n)
        return up.finish(placements)


def dlpack_view(raw: object, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The ``dtype`` x ``shape`` torch tensor over the bytes of ``raw`` (a uint8 array of any library
    that speaks DLPack: a CuPy device buffer, or numpy on the CPU), sharing its memory: the engine
    computes straight from the device copy in its stored dtype, never a widened copy of a matrix."""
    from butterfly.engine.weights import TORCH_DTYPES

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"the engine cannot compute in {dtype} (supported: {sorted(TORCH_DTYPES)})")
    tdtype = TORCH_DTYPES[dtype]
    count = math.prod(shape)
    raw_t = torch.from_dlpack(raw)
    if raw_t.dtype != torch.uint8 or raw_t.dim() != 1:
        raise ValueError(f"expected a flat uint8 buffer, got {raw_t.dtype} {tuple(raw_t.shape)}")
    need = count * tdtype.itemsize
    if raw_t.numel() < need:
        raise ValueError(f"{raw_t.numel()} bytes cannot hold a {dtype} tensor of shape {tuple(shape)}")
    return raw_t[:need].view(tdtype).view(tuple(shape))


def device_weights(result: GpuUploadResult, tensors: Sequence[TensorSpec]) -> dict[str, torch.Tensor]:
    """Name -> torch view of the tensor's device copy, for every uploaded tensor of ``tensors``."""
    return {
        spec.name: dlpack_view(result.tensors[spec.name], spec.dtype, spec.shape)
        for spec in tensors
        if spec.name in result.tensors
    }


def gpu_warmup(
    result: GpuUploadResult,
    tensors: Sequence[TensorSpec],
    model_config: Mapping[str, object],
    where: str,
    blocks: tuple[int, int],
    num_blocks: int,
    beat: Callable[[], None] | None = None,
) -> WarmupStats:
    """The loader's warmup (a prefill and a decode step of the real engine), run on the device over
    the uploaded copies: cuBLAS/attention kernels load and every weight is read before the first
    request. Raises ``butterfly.loader.warmup.WarmupError`` like the CPU warmup."""
    return warmup_weights(
        lambda: device_weights(result, tensors),
        model_config,
        where,
        blocks,
        num_blocks,
        device=f"cuda:{result.device}",
        beat=beat,
    )
