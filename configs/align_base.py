"""The ALIGN recipe (Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation
Learning With Noisy Text Supervision"): EfficientNet-B7 at 289 px + BERT-base, 640-d embeddings.

    altjax-train --config configs/align_base.py --workdir gs://.../align \\
        --config.data.source=webdataset --config.data.files='/data/shards/*.tar' \\
        --config.data.tokenizer=/path/to/bert-base-uncased

Batch 16,384 (the paper's 1024 TPUv3 cores x 16), LAMB with peak learning rate 1e-3 and weight
decay 1e-5, 10k warmup steps then linear decay to 0, softmax contrastive loss with label
smoothing 0.1, learnable temperature initialised to 1.0, images resized to 346 and randomly
cropped to 289 (evaluation: the centre crop). BatchNorm statistics per replica of 16 examples, as
in per-core BatchNorm on TPU. The data source is left to the user (ALIGN's 1.8B noisy alt-texts
are not public: COYO-700M in img2dataset WebDataset shards is the usual substitute).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The ALIGN-base training config; see the module docstring."""
    c = ml_collections.ConfigDict()
    c.task = "align"
    c.seed = 0
    # The paper trains ~1.2M steps at batch 16k (about 12 epochs of 1.8B pairs).
    c.total_steps = 1_200_000
    c.batch_size = 16_384
    c.log_every = 100
    c.checkpoint_every = 2_000
    c.eval_every = 10_000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    # Warn when the loss has stayed at chance level (it has learned nothing) this many steps after
    # warmup; 0: never.
    c.warn_chance_steps = 2000
    c.compilation_cache_dir = "~/.cache/altjax/xla"  # compiled programs kept for restarts ("": off)
    # Several processes: one whose peer stays silent this long (a crash, a lost host) ends the run
    # with one line (seconds; 0: never).
    c.peer_timeout_s = 10.0
    c.grad_accum_steps = 1
    c.mesh = dict(data=-1, model=1)
    c.remat = True
    c.remat_policy = "dots_with_no_batch_dims_saveable"
    c.freeze = ""
    # A jax.profiler trace of num_steps steps from step start_step (numbered as in the logs; 0: no
    # trace) into WORKDIR/profile, for TensorBoard's Profile tab (altjax.training.profiler).
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))

    c.model = ml_collections.ConfigDict()
    c.model.preset = "align-base"
    c.model.init_from = ""
    c.model.dtype = "bfloat16"
    c.model.projection_dim = 640
    c.model.temperature_init_value = 1.0
    # Both towers scan their layers (scan_layers): the train step compiles 2.8x faster (162 -> 57 s)
    # and runs as fast (2.59 -> 2.39 s) and in less memory (4.5 -> 3.5 GB) than unrolled
    # (benchmarks/compile.py, one CPU device, batch 2).
    c.model.text = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, scan_layers=True)
    # EfficientNet-B7 widths/depths; hidden_dim 640 is the pooled feature ALIGN embeds directly.
    c.model.vision = dict(image_size=289, width_coefficient=2.0, depth_coefficient=3.1, hidden_dim=640,
                          bn_group_size=16, scan_layers=True)

    c.data = ml_collections.ConfigDict()
    c.data.source = "webdataset"
    c.data.scenes = dict(image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000, seed=0)
    c.data.name = ""
    c.data.files = ""
    c.data.data_dir = ""
    c.data.split = "train"
    c.data.image_key = "jpg"
    c.data.caption_key = "txt"
    c.data.lang = "en"
    c.data.tokenizer = ""
    c.data.max_length = 64
    # Resize to 346 x 346 and a random 289 x 289 crop (altjax.data.preprocess.align_image_config).
    c.data.augment = "random_crop"
    c.data.num_threads = 0
    c.data.prefetch = 2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "lamb"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 10_000
    c.optimizer.decay = "linear"
    c.optimizer.end_factor = 0.0
    c.optimizer.weight_decay = 1e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.grad_clip_norm = 0.0
    # Never decayed: norms (LayerNorm, BatchNorm), biases and the logit scalars (temperature,
    # logit_scale, logit_bias).
    c.optimizer.no_decay = r"(^|/)(bias|scale|temperature|logit_scale|logit_bias)$"

    c.loss = ml_collections.ConfigDict()
    # "softmax" (ALIGN) or "sigmoid" (SigLIP's loss; its bias starts at -10 and is learned unless
    # learn_bias is false; it is not part of the exported model).
    c.loss.kind = "softmax"
    c.loss.learn_bias = True
    c.loss.label_smoothing = 0.1
    # False holds model.temperature at temperature_init_value.
    c.loss.learn_temperature = True
    c.loss.impl = "ring"

    c.eval = ml_collections.ConfigDict()
    c.eval.datasets = ()
    c.eval.split = ""
    c.eval.batch_size = 1024
    c.eval.at_start = False
    c.eval.at_end = False
    return c
