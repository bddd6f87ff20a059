"""Losses and a tiny training step on a global ("data", "model") mesh; run by test_multihost.py.

As a script it is one process of a multi-process run:
    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=K in its environment;
it writes what ``compute`` returns, gathered to host NumPy arrays. The test also calls ``compute``
in its own single 8-device process for the reference.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altjax.losses import contrastive_loss
from altjax.sharding import make_mesh, path_to_str, process_batch_rows, shard_batch, sharded_init

BATCH, IMAGE_DIM, TEXT_DIM, EMBED_DIM = 32, 24, 20, 16
LOSSES = [("softmax", 0.1), ("sigmoid", 0.0)]
IMPLS = ("gather", "ring")
# Small enough that the tiny model's kernels get sharded by the default FSDP rule.
FSDP_MIN_SIZE = 64


class TinyDualEncoder(nnx.Module):
    """Linear image and text projections and a learnable AltCLIP-style logit scale."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.visual_projection = nnx.Linear(IMAGE_DIM, EMBED_DIM, use_bias=False, rngs=rngs)
        self.text_projection = nnx.Linear(TEXT_DIM, EMBED_DIM, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, jnp.float32))

    def __call__(self, image_features, text_features):
        def normalize(x):
            return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

        return (normalize(self.visual_projection(image_features)),
                normalize(self.text_projection(text_features)))


def global_data():
    """The same global batch in every process."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(BATCH, EMBED_DIM))
    text = 0.5 * image + rng.normal(size=(BATCH, EMBED_DIM))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return {
        "image_embeds": unit(image), "text_embeds": unit(text),
        "image_features": rng.normal(size=(BATCH, IMAGE_DIM)).astype(np.float32),
        "text_features": rng.normal(size=(BATCH, TEXT_DIM)).astype(np.float32),
    }


def to_host(tree):
    """Fully replicated host copies of (possibly multi-process) global arrays."""
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def compute(mesh) -> dict[str, np.ndarray]:
    """Loss values and gradients for every kind and impl, and one SGD step of the tiny model."""
    data = global_data()
    local = {k: v[process_batch_rows(mesh, BATCH)] for k, v in data.items()}
    batch = shard_batch(local, mesh)
    out = {}

    for kind, label_smoothing in LOSSES:
        for impl in IMPLS:
            def loss(image, text, scale, bias):
                return contrastive_loss(image, text, kind=kind, logit_scale=scale,
                                        logit_bias=bias if kind == "sigmoid" else None,
                                        label_smoothing=label_smoothing, mesh=mesh, impl=impl)

            value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
                batch["image_embeds"], batch["text_embeds"], jnp.float32(7.5), jnp.float32(-4.0))
            name = f"{kind}/{impl}"
            out[f"{name}/loss"] = value
            for arg, grad in zip(("image", "text", "scale", "bias"), grads):
                out[f"{name}/d_{arg}"] = grad

    model = sharded_init(lambda rngs: TinyDualEncoder(rngs=rngs), mesh, fsdp_min_size=FSDP_MIN_SIZE)
    graphdef, state = nnx.split(model)

    def model_loss(state, image_features, text_features):
        model = nnx.merge(graphdef, state)
        image, text = model(image_features, text_features)
        return contrastive_loss(image, text, kind="softmax", logit_scale=jnp.exp(model.logit_scale[...]),
                                label_smoothing=0.1, mesh=mesh, impl="ring")

    @jax.jit
    def train_step(state, image_features, text_features):
        value, grads = jax.value_and_grad(model_loss)(state, image_features, text_features)
        state = jax.tree.map(lambda p, g: p - 0.05 * g, state, grads)
        return value, grads, state, model_loss(state, image_features, text_features)

    value, grads, new_state, new_value = train_step(state, batch["image_features"], batch["text_features"])
    out["train/loss"] = value
    out["train/loss_after_step"] = new_value
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        out[f"train/d_{path_to_str(path)}"] = grad
    for path, param in jax.tree_util.tree_leaves_with_path(new_state):
        out[f"train/new_{path_to_str(path)}"] = param
    return to_host(out)


def main(argv):
    process_id, num_processes, port, out_path = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, cluster_detection_method="deactivate",
                               initialization_timeout=60)
    try:
        mesh = make_mesh(data=-1)
        out = compute(mesh)
        out["process_count"] = np.asarray(jax.process_count())
        out["global_devices"] = np.asarray(jax.device_count())
        np.savez(out_path, **out)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
