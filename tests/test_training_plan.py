"""``altjax-train --dry-run`` (altjax.training.plan): the table of a compiled but unrun step, on 8
simulated CPU devices; nothing written; the bytes it states are those of a real train state."""
import os
import subprocess
import sys

import jax
import numpy as np

from altjax import sharding, train
from altjax.training import plan as plans
from altjax.training.loop import build_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny ALIGN on 16 px crops of a small scenes set; the vision tower frozen, so that the table's
# trained and frozen parameters are both non-empty.
TINY = [
    "batch_size=16", "freeze=^vision_model/", "model.projection_dim=16",
    "model.text={'vocab_size': -1, 'hidden_size': 16, 'num_hidden_layers': 1, 'num_attention_heads': 2, "
    "'intermediate_size': 32, 'max_position_embeddings': 16, 'hidden_dropout_prob': 0.1, "
    "'attention_probs_dropout_prob': 0.1}",
    "model.vision={'image_size': 16, 'width_coefficient': 1.0, 'depth_coefficient': 1.0, 'kernel_sizes': (3, 3), "
    "'in_channels': (32, 8), 'out_channels': (8, 16), 'strides': (1, 2), 'num_block_repeats': (1, 1), "
    "'expand_ratios': (1, 2), 'hidden_dim': 16, 'drop_connect_rate': 0.2, 'bn_group_size': None}",
    "data.max_length=16", "data.scenes={'image_size': 32, 'num_train': 32, 'num_validation': 16, "
    "'num_test': 16, 'seed': 0}",
]


def real_bytes(tree) -> int:
    """The bytes the most loaded device holds of real sharded arrays, from their shards."""
    totals = {}
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values(), default=0)


def test_dry_run_of_the_demo_prints_the_table_and_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    existing = tmp_path / "existing"
    existing.mkdir()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    for target in (workdir, existing):
        out = subprocess.run([sys.executable, "-m", "altjax.train", "--config", "demo", "--workdir", str(target),
                              "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        for expected in ("8 cpu device(s), mesh data 8 x model 1", "batch: global 64, 8 per device, gradient "
                         "accumulation 1", "trained parameters", "optimizer state", "temporaries",
                         "FLOPs per step"):
            assert expected in out.stdout, out.stdout
    assert not workdir.exists()
    assert list(existing.iterdir()) == []


def test_dry_run_bytes_are_those_of_a_real_state(tmp_path):
    config = train.load_config("demo", TINY)
    p = plans.plan(config)
    mesh = sharding.make_mesh(**config.mesh)
    _, state = build_run(config, str(tmp_path), mesh)
    # Sharded as the loop shards it.
    shardings = sharding.state_shardings(jax.eval_shape(lambda s: s, state), mesh)
    state = jax.jit(lambda s: s, out_shardings=shardings)(state)
    assert p.params_bytes == real_bytes(state["params"]) > 0
    assert p.frozen_bytes == real_bytes(state["frozen"]) > 0
    assert p.opt_bytes == real_bytes(state["opt"]) > 0
    assert p.other_bytes == real_bytes((state["rest"], state["step"]))
    # XLA's inputs are the state and the batch, nothing else.
    assert p.argument_bytes == p.params_bytes + p.frozen_bytes + p.opt_bytes + p.other_bytes + p.batch_bytes
    assert (p.global_batch, p.per_device_batch, p.accum_steps, p.devices) == (16, 2, 1, 8)
    assert p.temp_bytes > 0 and p.flops and np.isfinite(p.flops)


def test_dry_run_of_a_bad_config_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    status = train.main(["--config", "demo", "--workdir", str(workdir), "--dry-run", "--config.batch_size=12"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("altjax-train: error: ") and "batch_size" in err and len(err.splitlines()) == 1, err
    assert not workdir.exists()
