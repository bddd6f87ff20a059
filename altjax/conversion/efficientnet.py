"""Mapping between transformers' ``AlignVisionModel`` state dict and ``altjax.models.efficientnet.EfficientNet``.

Keys are relative to the vision tower; ALIGN's table places them under ``vision_model.`` with
``engine.prefixed``. Conv kernels (depthwise ones too) change layout OIHW <-> HWIO; BatchNorm
running statistics are copied, and ``num_batches_tracked`` (unused: every BatchNorm has a momentum)
is dropped on import and written as 0 on export.
"""
from __future__ import annotations

from altjax.conversion.engine import Row, Table
from altjax.models.efficientnet import EfficientNetConfig, block_specs


def _conv(name: str, *, bias: bool = False) -> list[Row]:
    rows = [Row(f"{name}.weight", f"{name}.kernel", "conv")]
    return rows + [Row(f"{name}.bias", f"{name}.bias")] if bias else rows


def _batch_norm(name: str) -> list[Row]:
    return [
        Row(f"{name}.weight", f"{name}.scale"),
        Row(f"{name}.bias", f"{name}.bias"),
        Row(f"{name}.running_mean", f"{name}.mean"),
        Row(f"{name}.running_var", f"{name}.var"),
        Row(f"{name}.num_batches_tracked", f"{name}.num_batches_tracked", "counter"),
    ]


STEM = [*_conv("embeddings.convolution"), *_batch_norm("embeddings.batchnorm")]

# Only blocks whose expand_ratio is not 1 have these; "{i}" is the global block index.
EXPANSION = [
    *_conv("encoder.blocks.{i}.expansion.expand_conv"),
    *_batch_norm("encoder.blocks.{i}.expansion.expand_bn"),
]

# Every block, in the reference's registration order.
BLOCK = [
    *_conv("encoder.blocks.{i}.depthwise_conv.depthwise_conv"),
    *_batch_norm("encoder.blocks.{i}.depthwise_conv.depthwise_norm"),
    *_conv("encoder.blocks.{i}.squeeze_excite.reduce", bias=True),
    *_conv("encoder.blocks.{i}.squeeze_excite.expand", bias=True),
    *_conv("encoder.blocks.{i}.projection.project_conv"),
    *_batch_norm("encoder.blocks.{i}.projection.project_bn"),
]


def _expand(template: list[Row], i: int) -> list[Row]:
    return [Row(r.torch.format(i=i), None if r.nnx is None else r.nnx.format(i=i), r.layout) for r in template]


def efficientnet_rows(config: EfficientNetConfig) -> list[Row]:
    """Every tensor of the vision tower, keys relative to it (``embeddings.convolution.weight``, ...)."""
    rows = list(STEM)
    for spec in block_specs(config):
        if spec.expand:
            rows += _expand(EXPANSION, spec.index)
        rows += _expand(BLOCK, spec.index)
    return rows


def efficientnet_table(config: EfficientNetConfig) -> Table:
    """The table of a standalone vision tower (an ``AlignVisionModel`` state dict)."""
    return Table(rows=tuple(efficientnet_rows(config)))
