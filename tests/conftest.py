"""Test setup: 8 simulated CPU devices, float32 matmuls at full precision, torch on 2 threads.

The environment variables must be set before jax is imported anywhere, which is why this file
sets them at import time rather than in a fixture.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training runs turn JAX's persistent compilation cache on (config.compilation_cache_dir, under the
# user's home) unless JAX has one already: the tests' runs keep theirs in a temporary directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="altjax-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

# Parity tests compare fp32 results at 1e-5; XLA's CPU default is already full fp32, this pins it.
jax.config.update("jax_default_matmul_precision", "highest")

try:
    import torch  # noqa: E402

    torch.set_num_threads(min(2, os.cpu_count() or 1))
except ImportError:  # the library itself does not need torch; tests that do import it themselves
    pass
