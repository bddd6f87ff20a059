"""Compile time of a CLIP training gradient with the encoder layers unrolled vs scanned.

    python benchmarks/compile_scan.py                  # hidden 64, 24 + 24 layers, median of 3
    python benchmarks/compile_scan.py --layers 12 --repeats 5

A narrow ``CLIPModel`` (width 64, 4 heads, 32 px images in 8 px patches, 16 tokens) is built with
``scan_layers`` off and on; for each, ``jax.jit(jax.grad(loss))`` is traced, lowered and compiled
from scratch (``jax.clear_caches()`` before every repeat) and the median wall time of each phase
is printed side by side with the ratio. The figures are wall times: the machine's load (printed
from ``/proc/loadavg`` at the start and the end) inflates them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from altjax.models.clip import CLIPConfig, CLIPModel  # noqa: E402
from altjax.models.clip_text import CLIPTextConfig  # noqa: E402
from altjax.models.vit import CLIPVisionConfig  # noqa: E402


def narrow_clip(layers: int, scan_layers: bool) -> CLIPConfig:
    return CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=4, max_position_embeddings=16, projection_dim=64,
                                   pad_token_id=127, bos_token_id=126, eos_token_id=127, scan_layers=scan_layers),
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
                                       num_attention_heads=4, image_size=32, patch_size=8, projection_dim=64,
                                       scan_layers=scan_layers),
        projection_dim=64,
    )


def compile_times(config: CLIPConfig, batch: int) -> tuple[float, float]:
    """Seconds to trace + lower, and to compile, ``jax.jit(jax.grad(loss))`` of a fresh model."""
    model = CLIPModel(config, rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = np.full((batch, 16), 127, np.int32)
    ids[:, :4] = np.arange(4)
    inputs = dict(input_ids=jnp.asarray(ids), pixel_values=jnp.zeros((batch, 32, 32, 3), jnp.float32))

    def loss(params, inputs):
        return nnx.merge(graphdef, params, rest, copy=True)(**inputs, return_loss=True).loss

    jax.clear_caches()
    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params, inputs)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="layers per tower")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average (1/5/15 min) at start: {load()}")
    print(f"CLIP, width 64, {args.layers} vision + {args.layers} text layers, batch {args.batch}; "
          f"median of {args.repeats} (s)")
    results = {}
    for scan in (False, True):
        runs = [compile_times(narrow_clip(args.layers, scan), args.batch) for _ in range(args.repeats)]
        results[scan] = [statistics.median(r[i] for r in runs) for i in range(2)] + [
            statistics.median(sum(r) for r in runs)]
    print(f"{'phase':<16}{'unrolled':>10}{'scanned':>10}{'ratio':>8}")
    for i, phase in enumerate(("trace + lower", "compile", "total")):
        unrolled, scanned = results[False][i], results[True][i]
        print(f"{phase:<16}{unrolled:>10.2f}{scanned:>10.2f}{unrolled / scanned:>7.1f}x")
    print(f"load average at end: {load()}")


if __name__ == "__main__":
    main()
