"""``altjax-convert``: the command-line converters between HF PyTorch checkpoints and altjax.

Installed as the package ``altjax_convert``; the work is done by ``altjax.model_io`` and
the model registry ``altjax.models.registry``.
"""
