"""Conversion time and peak memory for full-size ALIGN (align-base), AltCLIP (ViT-L/14 + XLM-R large)
and CLIP (ViT-L/14).

For each model a random-weight HF checkpoint is written once with transformers (kept in --cache),
then each step runs in a fresh Python process so that its peak RSS is its own:

  to-altjax   HF dir -> altjax dir      (altjax-convert to-altjax)
  to-hf       altjax dir -> HF dir      (altjax-convert to-hf)
  baseline    the same process importing jax + altjax and doing nothing (subtracted for "net")

Prints wall time, peak RSS and peak RSS / checkpoint size (the goal is <= 2x). With --check the
round-trip parity table of ``altjax-convert to-altjax --check`` is printed too (needs torch).

  python benchmarks/convert.py [--models align-base altclip clip-vit-l14] [--cache /tmp/altjax-bench] [--check]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# Benchmark name -> (model_type, altjax preset).
MODELS = {
    "align-base": ("align", "align-base"),
    "altclip": ("altclip", "altclip"),
    "clip-vit-l14": ("clip", "clip-vit-l14"),
}

CHILD = r"""
import resource, sys, time, json
start = time.perf_counter()
import jax, altjax.models.registry  # noqa: F401  (the baseline)
from altjax_convert.cli import main
argv = json.loads(sys.argv[1])
code = main(argv) if argv else 0
print(json.dumps({"code": code, "seconds": time.perf_counter() - start,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), file=sys.stderr)
"""


def make_checkpoint(name: str, directory: str) -> None:
    import torch
    import transformers

    from altjax.models import registry

    model_type, preset = MODELS[name]
    kind = registry.get(model_type)
    config = kind.config.from_preset(preset).to_hf()
    torch.manual_seed(0)
    model = getattr(transformers, kind.transformers_class)(transformers.AutoConfig.for_model(config.pop("model_type"),
                                                                                             **config))
    # transformers' default init (normal, std 0.02) makes a random EfficientNet-B7 overflow to inf;
    # He fan-out init, as EfficientNet's authors and altjax use, keeps the embeddings finite (and
    # leaves a ViT's patch embedding, the only conv of the others, well scaled).
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out")
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.rename(tmp, directory)


def run_child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"step {argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["stdout"] = proc.stdout
    return result


def size_of(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["align-base", "altclip"], choices=list(MODELS))
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "altjax-bench"))
    parser.add_argument("--check", action="store_true", help="also time to-altjax --check and print its table")
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    baseline = run_child([])
    print(f"baseline (python + jax + altjax imported): peak RSS {baseline['peak_rss'] / 2**20:.0f} MiB\n")
    header = f"{'model':<12} {'step':<16} {'checkpoint':>11} {'time':>8} {'peak RSS':>10} {'net RSS':>10} {'RSS/ckpt':>9} {'net/ckpt':>9}"
    rows = []
    for name in args.models:
        hf = os.path.join(args.cache, name)
        if not os.path.isdir(hf):
            t = time.perf_counter()
            make_checkpoint(name, hf)
            print(f"{name}: wrote a random HF checkpoint in {time.perf_counter() - t:.0f}s")
        ckpt = size_of(hf)
        work = tempfile.mkdtemp(dir=args.cache)
        try:
            steps = [("to-altjax", ["to-altjax", hf, os.path.join(work, "jax"), "--quiet"]),
                     ("to-hf", ["to-hf", os.path.join(work, "jax"), os.path.join(work, "hf"), "--quiet"])]
            if args.check:
                steps.append(("to-altjax --check", ["to-altjax", hf, os.path.join(work, "jax2"), "--check", "--quiet"]))
            for step, argv in steps:
                r = run_child(argv)
                net = r["peak_rss"] - baseline["peak_rss"]
                rows.append(f"{name:<12} {step:<16} {ckpt / 1e9:>9.2f}GB {r['seconds']:>7.1f}s "
                            f"{r['peak_rss'] / 1e9:>8.2f}GB {net / 1e9:>8.2f}GB {r['peak_rss'] / ckpt:>8.2f}x {net / ckpt:>8.2f}x")
                print(rows[-1], flush=True)
                if "--check" in argv:
                    print(r["stdout"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + header + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
