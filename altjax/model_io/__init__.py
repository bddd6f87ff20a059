"""Model I/O: model directories on disk and the mapping between altjax and transformers weights.

``pretrained`` (``from_pretrained`` / ``save_pretrained`` for every model), ``directories`` (what
an HF or altjax directory holds, which files of a Hub repo make one, atomic writes), ``hf_weights``
(safetensors, sharded, .bin, read and written one tensor at a time), ``orbax_params`` (altjax
directories' parameters), ``safetensors_io`` (the file format), ``engine`` (applies a model's table
both ways, checking every key and shape) and ``parity`` (one batch through transformers and altjax,
compared). It knows no specific model: each model brings its config class and table
(``altjax.models``).
"""
