"""Time of ``CLIPModel.from_pretrained`` against the towers' depth, layers unrolled vs scanned.

    python benchmarks/load_time.py                        # 2, 12, 24, 48 layers per tower, median of 2
    python benchmarks/load_time.py --layers 2 24 --repeats 3

For each depth a narrow CLIP (width 64, as benchmarks/compile_scan.py builds it) is written once as
an HF directory (safetensors, per-layer keys), then loaded with ``scan_layers`` off and on, each from
a cleared JAX cache. The median wall time of each is printed with its growth against the shallowest
depth: a load linear in depth grows as the layer count does. Wall times: the machine's load (printed
at the start and the end) inflates them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from altjax.models.clip import CLIPModel  # noqa: E402
from compile_scan import narrow_clip  # noqa: E402  (benchmarks/ is the script's directory)


def load_seconds(directory: str, scan_layers: bool, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        model = CLIPModel.from_pretrained(directory, scan_layers=scan_layers)
        jax.block_until_ready(nnx.state(model, nnx.Param))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 12, 24, 48])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for layers in args.layers:
            directory = os.path.join(root, f"clip-{layers}")
            CLIPModel(narrow_clip(layers, False), rngs=nnx.Rngs(0)).save_pretrained(directory, format="hf")
            rows.append((layers, load_seconds(directory, False, args.repeats), load_seconds(directory, True, args.repeats)))
    base_layers, base_unrolled, base_scanned = rows[0]
    print(f"{'layers/tower':>12}  {'unrolled s':>10}  {'growth':>7}  {'scanned s':>10}  {'growth':>7}  {'depth x':>7}")
    for layers, unrolled, scanned in rows:
        print(f"{layers:>12}  {unrolled:>10.2f}  {unrolled / base_unrolled:>6.1f}x  {scanned:>10.2f}  "
              f"{scanned / base_scanned:>6.1f}x  {layers / base_layers:>6.1f}x")
    print(f"load average at end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
