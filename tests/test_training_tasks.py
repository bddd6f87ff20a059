"""altjax.training.tasks: the registry, and a task defined here (a toy dual encoder on random vectors)
trained by the generic loop with freezing, gradient accumulation and the SigLIP bias."""
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from altjax import train
from altjax.training import checks, objectives, tasks
from altjax.training.tasks.base import Task

DIM = 6


class ToyDualEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.image_proj = nnx.Linear(DIM, 4, rngs=rngs)
        self.text_proj = nnx.Linear(DIM, 4, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(1.0))

    def save_pretrained(self, path: str, overwrite: bool = False) -> None:
        del overwrite
        os.makedirs(path, exist_ok=True)
        flat = {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(self, nnx.Param))}
        np.savez(os.path.join(path, "params.npz"), **flat)


class ToyPipeline:
    """Pairs of noisy copies of one random vector: global batch ``batch`` is a function of the seed
    and its number alone, of which the pipeline gives its ``rows``, so a resumed pipeline continues
    where the checkpoint says on any topology."""

    def __init__(self, batch_size: int, seed: int, rows):
        self.batch_size, self.seed, self.rows, self.batch, self.epoch = batch_size, seed, rows, 0, 0

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.batch])
        self.batch += 1
        x = rng.normal(size=(self.batch_size, DIM)).astype(np.float32)
        noise = 0.1 * rng.normal(size=x.shape).astype(np.float32)
        return {"image": x[self.rows], "text": (x + noise)[self.rows]}

    def get_state(self):
        return {"epoch": self.epoch, "batch": self.batch, "skipped": 0}

    def set_state(self, state):
        self.batch = state["batch"]

    def close(self):
        pass


def check(c: checks.Checker) -> None:
    checks.check_contrastive_loss(c)


def build(config, directory, mesh):
    return ToyDualEncoder(nnx.Rngs(int(config.seed))), None


def pipeline(config, processor, directory, rows):
    return ToyPipeline(int(config.batch_size), int(config.seed), rows)


def objective(config):
    loss = config.loss
    return objectives.contrastive(
        lambda m, b: m.image_proj(b["image"]), lambda m, b: m.text_proj(b["text"]),
        lambda m: jnp.exp(m.logit_scale[...]), kind=loss.kind, label_smoothing=float(loss.label_smoothing),
        learn_temperature=bool(loss.learn_temperature), learn_bias=bool(loss.learn_bias), impl=loss.impl)


TOY = Task("toy", check=check, build=build, pipeline=pipeline, objective=objective)


def test_the_shipped_tasks_are_registered():
    assert set(tasks.TASKS) >= {"align", "clip", "altclip_distill", "altclip_contrastive"}, sorted(tasks.TASKS)


def test_a_task_defined_outside_altjax_trains_in_the_generic_loop(tmp_path):
    tasks.register(TOY)
    overrides = ["task=toy", "total_steps=6", "batch_size=64", "log_every=1", "checkpoint_every=3", "remat=true",
                 "grad_accum_steps=2", "freeze=^text_proj/bias", "loss.kind=sigmoid", "optimizer.name=adamw",
                 "optimizer.learning_rate=0.05", "optimizer.warmup_steps=0", "eval.datasets=()",
                 "eval.at_start=false", "eval.at_end=false"]
    config = train.load_config("demo", overrides)
    result = train.train(config, str(tmp_path / "run"))
    assert result["step"] == 6
    records = train.read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records] == list(range(1, 7)), records
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0], f"the toy task's loss did not fall: {losses}"
    assert all("logit_bias" in r for r in records), "the sigmoid loss's bias is not reported"
    assert records[-1]["logit_bias"] != records[0]["logit_bias"], "the attached bias did not train"

    exported = dict(np.load(tmp_path / "run" / "model" / "params.npz"))
    assert "logit_bias" not in exported, f"the run's bias was exported: {sorted(exported)}"
    initial = ToyDualEncoder(nnx.Rngs(int(config.seed)))
    assert np.array_equal(exported["text_proj/bias"], np.asarray(initial.text_proj.bias[...])), "a frozen bias moved"
    assert not np.array_equal(exported["text_proj/kernel"], np.asarray(initial.text_proj.kernel[...])), \
        "a trainable kernel did not move"
