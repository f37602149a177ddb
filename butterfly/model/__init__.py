"""Model checkpoints: safetensors parsing (hostile-input safe), the layer map, and a test model.

Owns: knowing what a checkpoint directory holds and where each tensor's bytes are (``load_layout``),
and the refusal of anything that is not clean safetensors. Must not: read or hash tensor data, talk to
sources (S3, cache) or the GPU; the loader, manifest and validator build on these answers.
"""

from butterfly.model.layout import LayerRange, LayerUnit, ModelLayout, TensorEntry, load_layout
from butterfly.model.safetensors import (
    LazyTensor,
    ModelFormatError,
    SafetensorsHeader,
    TensorInfo,
    parse_header_bytes,
    read_header,
    write_safetensors,
)
from butterfly.model.testmodel import make_test_model, model_size_bytes

__all__ = [
    "LayerRange",
    "LayerUnit",
    "LazyTensor",
    "ModelFormatError",
    "ModelLayout",
    "SafetensorsHeader",
    "TensorEntry",
    "TensorInfo",
    "load_layout",
    "make_test_model",
    "model_size_bytes",
    "parse_header_bytes",
    "read_header",
    "write_safetensors",
]
