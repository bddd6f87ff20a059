"""A narrow dual encoder's training gradient with its layers unrolled vs scanned: compile time and
steady step time, side by side.

    python benchmarks/compile_scan.py                   # AltCLIP, width 64, 24 + 24 layers
    python benchmarks/compile_scan.py --model clip --layers 12 --repeats 5
    python benchmarks/compile_scan.py --preset altclip --batch 2   # the released AltCLIP (L/14, 24 + 24)

The model (AltCLIP: CLIP ViT + XLM-R; or CLIP) has width 64, 4 heads, 32 px images in 8 px patches
and 16 tokens, so that the figures show what depth costs rather than what width costs; with
``--preset``, an AltCLIP preset at full size (its image size, 16 tokens). For each
layout, ``jax.jit(jax.value_and_grad(loss))`` is traced, lowered and compiled from scratch
(``jax.clear_caches()`` before every repeat), the last compilation of each is called ``--steps`` times; the medians are printed side by side
with their ratio. The layouts alternate, so load drifts hit both alike; the load average is
printed at the start and the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from altjax.models.altclip import AltCLIPConfig, AltCLIPModel  # noqa: E402
from altjax.models.clip import CLIPConfig, CLIPModel  # noqa: E402
from altjax.models.clip_text import CLIPTextConfig  # noqa: E402
from altjax.models.vit import CLIPVisionConfig  # noqa: E402
from altjax.models.xlm_roberta import XLMRobertaConfig  # noqa: E402

WIDTH, TOKENS, IMAGE, PATCH = 64, 16, 32, 8


def narrow_vision(layers: int, scan_layers: bool) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=layers,
                            num_attention_heads=4, image_size=IMAGE, patch_size=PATCH, projection_dim=WIDTH,
                            scan_layers=scan_layers)


def narrow_clip(layers: int, scan_layers: bool) -> CLIPConfig:
    return CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=128, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                                   num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=TOKENS,
                                   projection_dim=WIDTH, pad_token_id=127, bos_token_id=126, eos_token_id=127,
                                   scan_layers=scan_layers),
        vision_config=narrow_vision(layers, scan_layers),
        projection_dim=WIDTH,
    )


def narrow_altclip(layers: int, scan_layers: bool) -> AltCLIPConfig:
    return AltCLIPConfig(
        text_config=XLMRobertaConfig(vocab_size=128, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                                     num_hidden_layers=layers, num_attention_heads=4,
                                     max_position_embeddings=TOKENS + 2, project_dim=WIDTH, scan_layers=scan_layers),
        vision_config=narrow_vision(layers, scan_layers),
        projection_dim=WIDTH,
    )


MODELS = {"altclip": (narrow_altclip, AltCLIPModel), "clip": (narrow_clip, CLIPModel)}


def preset_altclip(name: str, scan_layers: bool) -> AltCLIPConfig:
    config = AltCLIPConfig.from_preset(name)
    return dataclasses.replace(config, text_config=dataclasses.replace(config.text_config, scan_layers=scan_layers),
                               vision_config=dataclasses.replace(config.vision_config, scan_layers=scan_layers))


def measure(model_name: str, layers: int, scan_layers: bool, batch: int, preset: str | None = None):
    """(seconds to trace + lower, seconds to compile, the compiled gradient, its arguments)."""
    make_config, model_class = MODELS[model_name]
    config = preset_altclip(preset, scan_layers) if preset else make_config(layers, scan_layers)
    model = model_class(config, rngs=nnx.Rngs(0))
    model.train()
    image = config.vision_config.image_size
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = np.full((batch, TOKENS), 1, np.int32)  # the pad id of both tokenizers' configs here
    ids[:, 0], ids[:, 1:5], ids[:, 5] = 0, np.arange(3, 7), 2
    inputs = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray((ids != 1).astype(np.int32)),
                  pixel_values=jnp.asarray(np.random.RandomState(0).randn(batch, image, image, 3), jnp.float32))
    if model_name == "clip":
        inputs["input_ids"] = jnp.where(inputs["input_ids"] == 1, 127, inputs["input_ids"])

    def loss(params, inputs):
        return nnx.merge(graphdef, params, rest, copy=True)(**inputs, return_loss=True).loss

    jax.clear_caches()
    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, inputs)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at, compiled, (params, inputs)


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="altclip")
    parser.add_argument("--layers", type=int, default=24, help="layers per tower")
    parser.add_argument("--repeats", type=int, default=3, help="compilations per layout")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--preset", choices=("altclip", "altclip-b32"),
                        help="an AltCLIP preset at full size instead of the narrow model (--layers ignored)")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
          f"load average (1/5/15 min) at start: {load()}")
    what = (f"AltCLIP preset {args.preset}" if args.preset else
            f"{args.model}, width {WIDTH}, {args.layers} vision + {args.layers} text layers")
    print(f"{what}, batch {args.batch}; "
          f"compile: median of {args.repeats}, step: median of {args.steps} (s)")
    compile_runs = {False: [], True: []}
    step_runs = {False: [], True: []}
    for repeat in range(args.repeats):
        for scan in (False, True):
            lower_s, compile_s, fn, fn_args = measure("altclip" if args.preset else args.model, args.layers, scan,
                                                      args.batch, args.preset)
            compile_runs[scan].append((lower_s, compile_s, lower_s + compile_s))
            if repeat == args.repeats - 1:
                # Timed here, one layout at a time, so that a full-size model's two copies never
                # share the memory.
                jax.block_until_ready(fn(*fn_args))
                for _ in range(args.steps):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*fn_args))
                    step_runs[scan].append(time.perf_counter() - start)
            del fn, fn_args

    print(f"{'phase':<16}{'unrolled':>10}{'scanned':>10}{'unrolled/scanned':>18}")
    rows = [(phase, [statistics.median(r[i] for r in compile_runs[s]) for s in (False, True)])
            for i, phase in enumerate(("trace + lower", "compile", "total"))]
    rows.append(("step", [statistics.median(step_runs[s]) for s in (False, True)]))
    for phase, (unrolled, scanned) in rows:
        print(f"{phase:<16}{unrolled:>10.4f}{scanned:>10.4f}{unrolled / scanned:>17.2f}x")
    print(f"load average at end: {load()}")


if __name__ == "__main__":
    main()
