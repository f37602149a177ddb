"""Tensors on stage links: raw bytes with their dtype and shape named in the frame's header (never
pickle), and back, checked against each other."""

from __future__ import annotations

import warnings
from typing import Final

import torch

from butterfly.serving.link import LinkError

__all__ = ["DTYPES", "tensor_bytes", "tensor_from"]

DTYPES: Final = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
DTYPE_CODES: Final = {v: k for k, v in DTYPES.items()}


def tensor_bytes(t: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """(dtype code, shape, raw bytes) of a CPU copy of ``t``; no pickling, no copy when contiguous."""
    if t.dtype not in DTYPE_CODES:
        raise ValueError(f"cannot send a {t.dtype} tensor over a stage link")
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8).numpy().data if t.numel() else memoryview(b"")
    return DTYPE_CODES[t.dtype], list(t.shape), raw


def tensor_from(dtype: str, shape: list[int], raw: bytes | bytearray | memoryview) -> torch.Tensor:
    """The tensor a header and its raw bytes describe; LinkError if they disagree."""
    tdtype = DTYPES.get(dtype)
    if tdtype is None:
        raise LinkError(f"a frame names tensor dtype {dtype!r}; known: {sorted(DTYPES)}")
    count = 1
    for d in shape:
        count *= d
    size = torch.empty((), dtype=tdtype).element_size()
    if count * size != len(raw):
        raise LinkError(f"a frame's tensor {dtype} {shape} needs {count * size} bytes, it carries {len(raw)}")
    if count == 0:
        return torch.empty(tuple(shape), dtype=tdtype)
    # A view of the received bytes, no copy: a link opens each frame into a buffer of its own.
    # (torch warns on a read-only buffer; the stage only reads its input, so that would be fine too.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(raw, dtype=tdtype, count=count).view(tuple(shape))
