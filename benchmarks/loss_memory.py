"""Per-device memory and step time of the contrastive loss: naive vs all-gather vs ring.

    python benchmarks/loss_memory.py                       # B in 1k, 4k, 16k, 64k; D=640; 8 devices
    python benchmarks/loss_memory.py --sizes 1024,4096     # a quick run

"naive" is the single-device reference (the whole B x B logits on one device); "gather" and
"ring" are ``contrastive_loss(..., mesh=..., impl=...)`` on N simulated CPU devices. For each, the
value and the gradients with respect to both embeddings and the scale are compiled; the memory is
the compiled executable's ``memory_analysis()`` per device (temporaries, excluding inputs and
outputs), the time the median wall time of a step. The simulated devices share this machine's
RAM, so a variant whose N devices would need more than the memory available is compiled (for its
numbers) but not run, and reported as such with its estimated footprint.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def _setup_devices(num_devices: int) -> None:
    # Must happen before jax is imported (as in tests/conftest.py).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def measure(b: int, dim: int, impl: str, mesh, *, kind: str, label_smoothing: float, repeats: int,
            max_seconds: float, memory_fraction: float, run: bool = True) -> dict:
    """Compiles one variant, runs it if it fits, and returns its numbers."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from altjax.losses import contrastive_loss
    from altjax.sharding import batch_sharding

    num = 1 if impl == "naive" else mesh.devices.size

    def loss(image, text, scale):
        return contrastive_loss(image, text, kind=kind, logit_scale=scale, label_smoothing=label_smoothing,
                                mesh=None if impl == "naive" else mesh, impl="gather" if impl == "naive" else impl)

    if impl == "naive":
        embed_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
        embed_sharding = batch_sharding(mesh)
    scalar_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if impl == "naive" else \
        jax.sharding.NamedSharding(mesh, jax.P())
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    shape = jax.ShapeDtypeStruct((b, dim), jnp.float32, sharding=embed_sharding)
    compiled = step.lower(shape, shape, jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar_sharding)).compile()
    memory = compiled.memory_analysis()
    temp = memory.temp_size_in_bytes
    footprint = num * (temp + memory.argument_size_in_bytes + memory.output_size_in_bytes)
    row = {"B": b, "impl": impl, "devices": num, "temp_per_device": temp, "footprint": footprint,
           "block_bytes": (b // mesh.devices.size) ** 2 * 4, "times": [], "status": "ok"}
    available = _available_bytes()
    if footprint > memory_fraction * available:
        row["status"] = f"not run: needs ~{_gb(footprint)}, {_gb(available)} available"
        return row
    if not run:
        row["status"] = "compiled only"
        return row

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    image = jax.device_put(unit(rng.normal(size=(b, dim))), embed_sharding)
    text = jax.device_put(unit(rng.normal(size=(b, dim))), embed_sharding)
    scale = jax.device_put(jnp.float32(14.3), scalar_sharding)


    def timed():
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(image, text, scale))
        return time.perf_counter() - t0

    # The first call is a warm-up, unless a step is so slow that the budget allows no more.
    first = timed()
    if first * (repeats + 1) > max_seconds:
        row["times"].append(first)
    start = time.perf_counter()
    while len(row["times"]) < repeats and time.perf_counter() - start + first < max_seconds:
        row["times"].append(timed())
    return row


def format_table(rows: list[dict], impls: list[str], repeats: int) -> str:
    """One line per batch size, the impls side by side: memory per device | median step time."""
    by_size: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_size.setdefault(row["B"], {})[row["impl"]] = row
    head = f"{'B':>7} | " + " | ".join(f"{impl + ' temp/dev':>17} {'step':>9}" for impl in impls) \
        + " | ring temp / (B/N)^2 block"
    lines = [head, "-" * len(head)]
    notes = []
    for b, cells in sorted(by_size.items()):
        parts = []
        for impl in impls:
            row = cells.get(impl)
            if row is None:
                parts.append(f"{'-':>17} {'-':>9}")
                continue
            time_s = f"{statistics.median(row['times']):.3f}s" if row["times"] else "not run"
            parts.append(f"{_gb(row['temp_per_device']):>17} {time_s:>9}")
            if row["status"] not in ("ok", "compiled only"):
                notes.append(f"B={b} {impl}: {row['status']} (compiled: {_gb(row['temp_per_device'])} "
                             f"temporaries per device x {row['devices']} device(s))")
            elif 0 < len(row["times"]) < repeats:
                notes.append(f"B={b} {impl}: median of {len(row['times'])} timed step(s), the time budget "
                             "allowed no more")
        ring = cells.get("ring")
        ratio = f"{ring['temp_per_device'] / ring['block_bytes']:.2f}" if ring else "-"
        lines.append(f"{b:>7} | " + " | ".join(parts) + f" | {ratio:>10}")
    footer = ("ring temp / block: per-device temporaries over one (B/N)^2 fp32 block of logits; it "
              "tends to a constant as B grows (the (B/N) x D embedding buffers dominate at small B).")
    return "\n".join(lines + ["", footer] + notes)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,4096,16384,65536", help="comma-separated global batch sizes")
    parser.add_argument("--dim", type=int, default=640, help="embedding dimension (ALIGN: 640)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--impls", default="naive,gather,ring")
    parser.add_argument("--kind", default="softmax", choices=["softmax", "sigmoid"])
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="stop repeating a variant after this long (at least one timed step)")
    parser.add_argument("--compile-only", action="store_true", help="memory numbers only, no steps")
    parser.add_argument("--memory-fraction", type=float, default=0.8,
                        help="run a variant only if its footprint fits this fraction of MemAvailable")
    args = parser.parse_args(argv)

    _setup_devices(args.devices)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax

    from altjax.sharding import make_mesh

    if jax.device_count() < args.devices:
        raise SystemExit(f"{jax.device_count()} devices available, {args.devices} requested "
                         "(XLA_FLAGS was set before this script could set it)")
    mesh = make_mesh(data=args.devices, devices=jax.devices()[: args.devices])
    impls = args.impls.split(",")
    rows = []
    load = os.getloadavg()[0]
    print(f"D={args.dim}, N={args.devices} simulated CPU devices, {args.kind} loss "
          f"(label smoothing {args.label_smoothing}), value and grad; load average {load:.2f} on "
          f"{os.cpu_count()} cores, {_gb(_available_bytes())} available", flush=True)
    for b in (int(s) for s in args.sizes.split(",")):
        if b % args.devices:
            raise SystemExit(f"batch size {b} is not divisible by {args.devices} devices")
        for impl in impls:
            row = measure(b, args.dim, impl, mesh, kind=args.kind, label_smoothing=args.label_smoothing,
                          repeats=args.repeats, max_seconds=args.max_seconds,
                          memory_fraction=args.memory_fraction, run=not args.compile_only)
            rows.append(row)
            times = ", ".join(f"{t:.3f}" for t in row["times"])
            print(f"  B={b} {impl}: temp/device {_gb(row['temp_per_device'])}, times [{times}] s, "
                  f"{row['status']}", flush=True)
    print()
    print(format_table(rows, impls, args.repeats))
    return rows


if __name__ == "__main__":
    main()
