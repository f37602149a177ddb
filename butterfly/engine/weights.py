"""Weight tensors as views of bytes that are already in memory: the loader's arena, or mmap'd files.

Owns turning (buffer, byte offset, safetensors dtype, shape) into a ``torch.Tensor`` that shares the
buffer's memory (``torch.frombuffer``: no copy, no widening), for the arena (``arena_weights``, from
the loader's ``TensorPlacement`` list and the layout's dtype/shape of each tensor) and for a model
directory opened directly (``open_model_dir``, for tests, benchmarks and tools).

A tensor keeps its buffer alive (and an mmap cannot be closed under it); the caller must not write
to the tensors. Must not: hash, validate or fetch bytes (the loader and validator do).
"""

from __future__ import annotations

import json
import mmap
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from butterfly.engine.config import ModelConfig
from butterfly.ipc import TensorPlacement
from butterfly.weights.layout import CONFIG_FILE, LayerRange, ModelLayout, TensorEntry, load_layout

__all__ = ["TORCH_DTYPES", "ModelDir", "arena_weights", "open_model_dir", "tensor_view"]

# safetensors dtype code -> torch dtype the engine computes in.
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def tensor_view(
    buf: memoryview | mmap.mmap | bytearray, offset: int, dtype: str, shape: Sequence[int]
) -> torch.Tensor:
    """The ``dtype`` x ``shape`` tensor at byte ``offset`` of ``buf``, sharing its memory."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"the engine cannot compute in {dtype} (supported: {sorted(TORCH_DTYPES)})")
    tdtype = TORCH_DTYPES[dtype]
    count = 1
    for d in shape:
        count *= d
    if count == 0:
        return torch.empty(tuple(shape), dtype=tdtype)
    # torch.frombuffer keeps a reference to the object it is given but releases its buffer export at
    # once, so an mmap under a bare tensor could be closed and the tensor left dangling. A memoryview
    # of our own holds the export for as long as the tensor lives: closing the mapping under live
    # weights is then a BufferError, never a segfault.
    export = memoryview(buf)
    with warnings.catch_warnings():
        # A read-only mapping (the engine child maps the arena read-only) is fine: we never write.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        t = torch.frombuffer(export, dtype=tdtype, count=count, offset=offset)
    return t.view(tuple(shape))


def arena_weights(
    buf: memoryview | mmap.mmap | bytearray,
    placements: Iterable[TensorPlacement],
    entries: Iterable[TensorEntry],
) -> dict[str, torch.Tensor]:
    """Name -> view of the arena, for every placed tensor; dtype and shape come from ``entries``
    (``ModelLayout.tensors_for_blocks`` of the same range)."""
    specs = {e.name: e for e in entries}
    out = {}
    for p in placements:
        e = specs.get(p.name)
        if e is None:
            raise ValueError(f"tensor {p.name} is placed in the arena but the layout does not describe it")
        if e.length != p.length:
            raise ValueError(f"tensor {p.name}: {p.length} bytes placed, the layout says {e.length}")
        out[p.name] = tensor_view(buf, p.arena_offset, e.dtype, e.shape)
    return out


@dataclass
class ModelDir:
    """A model directory opened read-only: its config, layout and weights as views of mmap'd files."""

    path: Path
    raw_config: dict[str, object]
    config: ModelConfig
    layout: ModelLayout
    weights: dict[str, torch.Tensor]
    maps: list[mmap.mmap]

    def close(self) -> None:
        """Drop the views and unmap. A BufferError while tensors of this model are still referenced
        (a stage built over them): drop those first."""
        self.weights.clear()
        while self.maps:
            self.maps[-1].close()
            self.maps.pop()


def open_model_dir(path: Path, blocks: LayerRange | None = None) -> ModelDir:
    """Open a safetensors checkpoint in place (private copy-on-write maps: nothing is read up front).

    ``blocks`` limits the weights to those a node holding that range needs (default: all).
    """
    path = Path(path)
    layout = load_layout(path)
    raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    config = ModelConfig.from_json(raw, str(path / CONFIG_FILE))
    rng = blocks or LayerRange(0, layout.num_blocks)
    entries = layout.tensors_for_blocks(rng)
    maps: dict[str, mmap.mmap] = {}
    weights: dict[str, torch.Tensor] = {}
    try:
        for e in entries:
            if e.file not in maps:
                with open(path / e.file, "rb") as f:
                    maps[e.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            weights[e.name] = tensor_view(maps[e.file], e.offset, e.dtype, e.shape)
    except BaseException:
        weights.clear()
        for m in maps.values():
            m.close()
        raise
    return ModelDir(path, raw, config, layout, weights, list(maps.values()))
