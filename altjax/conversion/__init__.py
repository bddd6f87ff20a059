"""Weight conversion between Hugging Face PyTorch checkpoints and altjax NNX models."""
from altjax.conversion.engine import (
    ConversionError,
    Row,
    Table,
    load_params,
    model_params,
    model_shapes,
    nnx_to_torch,
    torch_to_nnx,
)

__all__ = [
    "ConversionError",
    "Row",
    "Table",
    "load_params",
    "model_params",
    "model_shapes",
    "nnx_to_torch",
    "torch_to_nnx",
]
