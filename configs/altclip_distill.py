"""AltCLIP phase 1, teacher learning (the AltCLIP paper, Table 6): the XLM-R student learns to
reproduce the frozen CLIP text encoder's embedding from parallel text, MSE, English-English pairs
as well as English-other.

    altjax-train --config configs/altclip_distill.py --workdir DIR \\
        --config.distill.teacher=CLIP_DIR --config.model.text_init_from=XLMR_DIR \\
        --config.data.source=files --config.data.files=pairs.tsv --config.data.tokenizer=XLMR_DIR

Batch 1024, AdamW lr 1e-4, weight decay 0.1, 500 warmup steps, gradient clipping 1.0, 10 epochs.
``total_steps`` is the 10 epochs of your corpus: ``10 * 2 * pairs / 1024`` (each translation pair
gives an English-English and an English-other training pair). The student is AltCLIP (XLM-R large
+ ``transformation`` to 768 = CLIP ViT-L/14's text width) initialised from ``model.text_init_from``
(an HF XLM-R checkpoint, converted on load); the teacher is ``distill.teacher`` (an HF or altjax
CLIP directory: openai/clip-vit-large-patch14), whose image tower AltCLIP also takes over.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The phase-1 recipe (see the module docstring)."""
    c = ml_collections.ConfigDict()
    c.task = "altclip_distill"
    c.seed = 0
    c.total_steps = 100_000
    c.batch_size = 1024
    c.log_every = 50
    c.checkpoint_every = 1000
    c.eval_every = 0
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    # No chance level for a regression: nothing to warn about.
    c.warn_chance_steps = 0
    c.compilation_cache_dir = "~/.cache/altjax/xla"  # compiled programs kept for restarts ("": off)
    # Several processes: one whose peer stays silent this long (a crash, a lost host) ends the run
    # with one line (seconds; 0: never).
    c.peer_timeout_s = 10.0
    c.grad_accum_steps = 1
    c.mesh = dict(data=-1, model=1)
    c.remat = False
    c.remat_policy = "nothing_saveable"
    # Only the student's text tower trains: the teacher is fixed, and the student's image side is the
    # teacher's (text_projection is not in the phase-1 loss; weight decay alone would shrink it).
    c.freeze = r"^teacher/|^student/(vision_model|visual_projection|text_projection|logit_scale)"
    # A jax.profiler trace of num_steps steps from step start_step (numbered as in the logs; 0: no
    # trace) into WORKDIR/profile, for TensorBoard's Profile tab (altjax.training.profiler).
    c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))

    c.model = ml_collections.ConfigDict()
    c.model.preset = "altclip"
    c.model.init_from = ""
    c.model.text_init_from = ""  # HF XLM-R (xlm-roberta-large)
    c.model.dtype = "bfloat16"
    c.model.projection_dim = 768
    c.model.text = dict(vocab_size=-1)
    c.model.vision = dict(image_size=224)

    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # CLIP directory (openai/clip-vit-large-patch14)
    c.distill.teacher_tokenizer = ""  # empty: the teacher directory's
    c.distill.teacher_max_length = 77
    c.distill.target = "pooled"

    c.data = ml_collections.ConfigDict()
    c.data.source = "files"  # or "scenes"
    c.data.files = ""  # comma-separated .tsv (english<TAB>translation) / .jsonl
    c.data.source_key = "en"
    c.data.target_key = "zh"
    c.data.same_language_pairs = True
    c.data.scenes = dict(image_size=64, num_train=10_000, num_validation=1_000, num_test=1_000, seed=0)
    c.data.data_dir = ""
    c.data.split = "train"
    c.data.tokenizer = ""  # the XLM-R tokenizer directory
    c.data.max_length = 77

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.decay = "linear"
    c.optimizer.end_factor = 0.0
    c.optimizer.weight_decay = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0
    # Never decayed: norms (LayerNorm, BatchNorm), biases and the logit scalars (temperature,
    # logit_scale, logit_bias).
    c.optimizer.no_decay = r"(^|/)(bias|scale|temperature|logit_scale|logit_bias)$"

    c.eval = ml_collections.ConfigDict()
    c.eval.datasets = ()
    c.eval.split = "test"
    c.eval.batch_size = 256
    c.eval.at_start = False
    c.eval.at_end = False
    return c
