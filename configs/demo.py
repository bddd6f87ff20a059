"""The demo: a tiny ALIGN (EfficientNet + BERT) trained from scratch on the embedded scenes dataset.

    altjax-train --config demo --workdir /tmp/demo
    python -m altjax.demos.align     # the same config, with evaluations before/after and a figure

Sized to learn image-text retrieval far above chance within a few minutes on a 2-core CPU: 32 px
images, a four-stage EfficientNet of 48 channels at its top, a two-layer BERT of width 64 over a
tokenizer made from the scenes captions' words, LAMB with warmup and linear decay.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The demo config (see the module docstring); every training config has these keys."""
    c = ml_collections.ConfigDict()
    c.task = "align"
    c.seed = 0
    c.total_steps = 600
    c.batch_size = 64
    c.log_every = 20
    c.checkpoint_every = 200
    c.eval_every = 0
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    # Warn when the loss has stayed at chance level (it has learned nothing) this many steps after
    # warmup; 0: never.
    c.warn_chance_steps = 100
    c.compilation_cache_dir = "~/.cache/altjax/xla"  # compiled programs kept for restarts ("": off)
    # Several processes: one whose peer stays silent this long (a crash, a lost host) ends the run
    # with one line (seconds; 0: never).
    c.peer_timeout_s = 10.0
    c.grad_accum_steps = 1
    c.mesh = dict(data=-1, model=1)
    # Rematerialisation of every layer (transformer layer, MBConv block) on its own in the backward
    # pass, under the jax.checkpoint_policies policy named remat_policy.
    c.remat = False
    c.remat_policy = "nothing_saveable"
    # Parameters whose path matches this regex do not train (LiT: "^vision_model/").
    c.freeze = ""
    # A jax.profiler trace of num_steps steps from step start_step (numbered as in the logs; 0: no
    # trace) into WORKDIR/profile, for TensorBoard's Profile tab (altjax.training.profiler).
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))

    c.model = ml_collections.ConfigDict()
    c.model.preset = "align-tiny"
    c.model.init_from = ""
    c.model.dtype = "float32"
    c.model.projection_dim = 48
    c.model.temperature_init_value = 0.1
    c.model.text = dict(vocab_size=-1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    c.model.vision = dict(image_size=32, width_coefficient=1.0, depth_coefficient=1.0,
                          kernel_sizes=(3, 3, 3, 3), in_channels=(32, 16, 24, 32), out_channels=(16, 24, 32, 48),
                          strides=(1, 2, 2, 2), num_block_repeats=(1, 1, 1, 1), expand_ratios=(1, 4, 4, 4),
                          hidden_dim=48, drop_connect_rate=0.0, bn_group_size=None)

    c.data = ml_collections.ConfigDict()
    c.data.source = "scenes"
    c.data.scenes = dict(image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000, seed=0)
    c.data.name = ""
    c.data.files = ""
    c.data.data_dir = ""
    c.data.split = "train"
    c.data.image_key = "image"
    c.data.caption_key = "caption"
    c.data.lang = "en"
    c.data.tokenizer = "scenes"
    c.data.max_length = 24
    c.data.augment = "random_crop"
    c.data.num_threads = 0
    c.data.prefetch = 2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "lamb"
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 50
    c.optimizer.decay = "linear"
    c.optimizer.end_factor = 0.0
    c.optimizer.weight_decay = 1e-5
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.grad_clip_norm = 1.0
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
    c.loss.impl = "gather"

    c.eval = ml_collections.ConfigDict()
    c.eval.datasets = ("retrieval/scenes/en", "zeroshot/scenes/en")
    c.eval.split = "test"
    c.eval.batch_size = 250
    c.eval.at_start = True
    c.eval.at_end = True
    return c
