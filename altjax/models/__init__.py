"""Towers (efficientnet, bert, vit, xlm_roberta, clip_text), the encoder the CLIP towers share
(clip_transformer), dual encoders (align; clip and altclip on dual_encoder), the kernels with
hand-written gradients (ops/), and the registry of the models altjax stores (registry)."""
