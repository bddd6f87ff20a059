"""AltCLIP phase 2, contrastive learning (the AltCLIP paper, Table 6): image-text pairs in both
languages, CLIP's softmax loss with the learned ``logit_scale`` and no label smoothing, the image
tower frozen, the text side trained.

    altjax-train --config configs/altclip_contrastive.py --workdir DIR \\
        --config.model.init_from=PHASE1_DIR/model --config.model.image_tower_from=CLIP_DIR

Batch 1024, AdamW lr 2e-6, weight decay 0.05, 2000 warmup steps, gradient clipping 5.0, 1 epoch
(``total_steps`` = pairs / 1024). ``model.init_from`` is phase 1's student (the ``model/``
directory of its run, which already holds CLIP's image tower); ``model.image_tower_from``, when
set, copies a CLIP directory's image tower (``vision_model``, ``visual_projection``,
``logit_scale``) in again.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The phase-2 recipe (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.task = "altclip_contrastive"
    c.seed = 0
    c.total_steps = 10_000
    c.batch_size = 1024
    c.log_every = 50
    c.checkpoint_every = 1000
    c.eval_every = 0
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    # Warn when the loss has stayed at chance level (it has learned nothing) this many steps after
    # warmup; 0: never.
    c.warn_chance_steps = 500
    c.compilation_cache_dir = "~/.cache/altjax/xla"  # compiled programs kept for restarts ("": off)
    # Several processes: one whose peer stays silent this long (a crash, a lost host) ends the run
    # with one line (seconds; 0: never).
    c.peer_timeout_s = 10.0
    c.grad_accum_steps = 1
    c.mesh = dict(data=-1, model=1)
    c.remat = False
    c.remat_policy = "nothing_saveable"
    # AltCLIP's image tower stays CLIP's.
    c.freeze = r"^vision_model|^visual_projection"
    # A jax.profiler trace of num_steps steps from step start_step (numbered as in the logs; 0: no
    # trace) into WORKDIR/profile, for TensorBoard's Profile tab (altjax.training.profiler).
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))

    c.model = ml_collections.ConfigDict()
    c.model.preset = "altclip"
    c.model.init_from = ""  # phase 1's student
    c.model.image_tower_from = ""  # a CLIP directory, optional
    c.model.text_init_from = ""
    c.model.dtype = "bfloat16"
    c.model.projection_dim = 768
    c.model.text = dict(vocab_size=-1)
    c.model.vision = dict(image_size=224)

    c.data = ml_collections.ConfigDict()
    # "scenes" (the embedded bilingual set, captions of data.langs), or tfds / webdataset / tfrecord /
    # array_record with one caption field per language in data.caption_keys, e.g. for WebDataset
    # shards with KEY.jpg, KEY.en.txt and KEY.zh.txt: image_key "jpg", caption_keys ("en.txt", "zh.txt").
    c.data.source = "scenes"
    c.data.langs = ("en", "zh")
    c.data.scenes = dict(image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000, seed=0)
    c.data.name = ""  # tfds dataset name
    c.data.files = ""  # shard pattern(s) for webdataset / tfrecord / array_record
    c.data.image_key = "image"
    c.data.caption_keys = ()
    c.data.data_dir = ""
    c.data.split = "train"
    c.data.tokenizer = ""  # empty: model.init_from's
    c.data.max_length = 77
    c.data.augment = ""
    c.data.num_threads = 0
    c.data.prefetch = 2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-6
    c.optimizer.warmup_steps = 2000
    c.optimizer.decay = "linear"
    c.optimizer.end_factor = 0.0
    c.optimizer.weight_decay = 0.05
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 5.0
    # Never decayed: norms (LayerNorm, BatchNorm), biases and the logit scalars (temperature,
    # logit_scale, logit_bias).
    c.optimizer.no_decay = r"(^|/)(bias|scale|temperature|logit_scale|logit_bias)$"

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "softmax"  # or "sigmoid" (SigLIP's, with a bias learned from -10 unless learn_bias is false)
    c.loss.learn_bias = True
    c.loss.label_smoothing = 0.0
    c.loss.learn_temperature = True
    c.loss.impl = "gather"

    c.eval = ml_collections.ConfigDict()
    c.eval.datasets = ("retrieval/scenes/en", "retrieval/scenes/zh")
    c.eval.split = "test"
    c.eval.batch_size = 256
    c.eval.at_start = False
    c.eval.at_end = True
    return c
