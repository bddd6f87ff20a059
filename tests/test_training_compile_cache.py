"""altjax.training.compile_cache: runs keep their compiled programs for the next start."""
import os
import subprocess
import sys
import textwrap

from altjax.training import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _without_jax_cache() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}


def test_a_cache_jax_already_has_wins():
    # tests/conftest.py gives this process one through JAX_COMPILATION_CACHE_DIR.
    assert compile_cache.enable("/nonexistent/elsewhere") == os.environ["JAX_COMPILATION_CACHE_DIR"]


def test_enable_turns_the_cache_on_off_or_warns(tmp_path):
    script = textwrap.dedent(f"""
        import os, jax
        import jax.numpy as jnp
        from altjax.training import compile_cache
        assert compile_cache.enable("") is None and not jax.config.jax_compilation_cache_dir
        blocked = os.path.join({str(tmp_path)!r}, "file")
        open(blocked, "w").close()
        assert compile_cache.enable(os.path.join(blocked, "cache")) is None
        jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()  # JAX decides about its cache here
        path = compile_cache.enable({str(tmp_path / "cache")!r})
        assert path == {str(tmp_path / "cache")!r} == jax.config.jax_compilation_cache_dir, path
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(5)).block_until_ready()
        print(sorted(os.listdir(path)))
    """)
    run = subprocess.run([sys.executable, "-c", script], env=_without_jax_cache(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "cannot create it" in run.stderr, run.stderr
    assert os.listdir(tmp_path / "cache"), "a compilation after enable() left nothing in the cache"


def test_a_training_run_fills_the_recipes_cache_under_home(tmp_path):
    """The demo recipe's default: ~/.cache/altjax/xla, used by a run with no cache of JAX's own."""
    env = dict(_without_jax_cache(), HOME=str(tmp_path / "home"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "altjax.train", "--config", "demo", "--workdir", str(tmp_path / "run"),
           "--config.total_steps=1", "--config.batch_size=8", "--config.eval.at_start=false",
           "--config.eval.at_end=false", f"--config.data.data_dir={tmp_path / 'data'}",
           "--config.data.scenes={'image_size': 32, 'num_train': 64, 'num_validation': 8, 'num_test': 8, 'seed': 0}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    cache = tmp_path / "home" / ".cache" / "altjax" / "xla"
    assert cache.is_dir() and len(os.listdir(cache)) >= 2, f"cache {cache}: {os.listdir(cache) if cache.is_dir() else 'missing'}"
