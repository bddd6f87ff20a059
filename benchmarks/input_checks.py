"""What the API-boundary input checks (``altjax.models.inputs``) cost: with them vs without, median.

    python benchmarks/input_checks.py                              # altclip-tiny, batch 8, 16 tokens
    python benchmarks/input_checks.py --model align-tiny --batch-size 32 --repeats 50

For one model preset and one batch (NumPy inputs, as a data loader gives them, and the same arrays
already on the device), it times side by side, median over ``--repeats`` calls after one warm-up (the two
variants alternate call by call, so that a change in the machine's load falls on both):

* the checks alone (``check_text`` + ``check_pixels`` as ``__call__`` runs them);
* eager ``get_text_features``, ``get_image_features`` and ``__call__`` with the checks and with
  them replaced by no-ops;
* the same ``__call__`` under ``nnx.jit``, where only the static checks run, at trace time (the
  compiled computation is identical, so the two columns should agree within noise).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from altjax.models import inputs  # noqa: E402

CHECKS = ("check_text", "check_pixels", "check_pairs")


def build(preset: str):
    if preset.startswith("align"):
        from altjax.models.align import AlignConfig as Config, AlignModel as Model
    elif preset.startswith("altclip"):
        from altjax.models.altclip import AltCLIPConfig as Config, AltCLIPModel as Model
    else:
        from altjax.models.clip import CLIPConfig as Config, CLIPModel as Model
    return Model(Config.from_preset(preset))


def batch(model, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    text, vision = model.config.text_config, model.config.vision_config
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    ids = rng.integers(3, min(text.vocab_size, 1000), size=(batch_size, seq_len))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "pixel_values": rng.normal(size=(batch_size, size, size, vision.num_channels)).astype(np.float32)}


def paired_medians(with_checks, without, repeats: int) -> tuple[float, float]:
    """Median ms of each of two calls, alternated call by call so that drift in the machine's load
    (other jobs, frequency changes) falls on both alike."""
    jax.block_until_ready(with_checks())  # warm-up (and compilation, for the jitted call)
    jax.block_until_ready(without())
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((with_checks, times[0]), (without, times[1])):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            out.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def without_checks(fn):
    """``fn`` with the checks replaced by no-ops while it runs."""
    def run():
        saved = {name: getattr(inputs, name) for name in CHECKS}
        try:
            for name in CHECKS:
                setattr(inputs, name, lambda *a, **k: None)
            return fn()
        finally:
            for name, value in saved.items():
                setattr(inputs, name, value)
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="altclip-tiny", help="a preset: align-tiny, altclip-tiny, clip-tiny, ...")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    model = build(args.model)
    name = type(model).__name__
    host = batch(model, args.batch_size, args.seq_len)
    device = {k: jnp.asarray(v) for k, v in host.items()}
    text_kw = ("input_ids", "attention_mask")
    roberta = name == "AltCLIPModel"

    def checks_only(b):
        def run():
            inputs.check_pairs(name, b["input_ids"], b["pixel_values"], False)
            vision = model.config.vision_config
            inputs.check_pixels(name, b["pixel_values"], vision.num_channels, nchw=True,
                                image_size=None if name == "AlignModel" else vision.image_size)
            inputs.check_text(name, model.config.text_config, b["input_ids"], b["attention_mask"],
                              roberta_positions=roberta)
        return run

    step = nnx.jit(lambda m, ids, mask, px: m(input_ids=ids, attention_mask=mask, pixel_values=px).logits_per_text)
    rows = []
    for where, b in (("numpy", host), ("device", device)):
        calls = {
            "checks alone": checks_only(b),
            "get_text_features": lambda b=b: model.get_text_features(*(b[k] for k in text_kw)),
            "get_image_features": lambda b=b: model.get_image_features(b["pixel_values"]),
            "__call__": lambda b=b: model(**b).logits_per_text,
            "__call__ under nnx.jit": lambda b=b: step(model, b["input_ids"], b["attention_mask"], b["pixel_values"]),
        }
        for label, fn in calls.items():
            # "checks alone" against a no-op: its second column is the timer's own overhead.
            other = (lambda: None) if label == "checks alone" else without_checks(fn)
            rows.append((where, label, *paired_medians(fn, other, args.repeats)))

    print(f"{name} ({args.model}), batch {args.batch_size} x {args.seq_len} tokens, "
          f"{model.config.vision_config.image_size}px images; median of {args.repeats} calls on "
          f"{jax.devices()[0].platform}")
    print(f"{'inputs':<8} {'call':<24} {'with checks':>13} {'without':>11} {'overhead':>10}")
    for where, label, with_ms, without_ms in rows:
        overhead = with_ms - without_ms
        share = f" ({100 * overhead / without_ms:+.1f}%)" if label != "checks alone" else ""
        print(f"{where:<8} {label:<24} {with_ms:10.3f} ms {without_ms:8.3f} ms {overhead:7.3f} ms{share}")


if __name__ == "__main__":
    main()
