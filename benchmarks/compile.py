"""Compile, first-step and steady-step time of the recipes' training steps, layers unrolled vs scanned.

    python benchmarks/compile.py                         # altclip-b32, altclip-l14; batch 2 per device
    python benchmarks/compile.py --models align-base,altclip-b32,altclip-l14 --json /tmp/compile.json
    python benchmarks/compile.py --models altclip-tiny   # a quick check, under a minute on 2 cores

Each model is a recipe's training step, built the way ``altjax-train`` builds it: the recipe
through ``altjax.train.load_config`` with overrides, the run through
``altjax.training.loop.build_run`` (the model with the recipe's remat setting on every layer, its
frozen parameters, optimiser and objective), the state sharded over the mesh as the training loop
shards it, and ``altjax.training.loop.build_step``'s jitted step. Once with the towers' layers
unrolled (``scan_layers`` false) and once scanned (``scan_layers`` true in ``model.text`` and
``model.vision``):

    align-base   configs/align_base.py: EfficientNet-B7 at 289 px + BERT-base, bf16, LAMB, remat
                 (dots_with_no_batch_dims_saveable); scanned, EfficientNet runs each stage's
                 repeats as one scan. The recipe's BatchNorm statistics
                 per 16 examples become per device's batch where that is smaller.
    altclip-b32  configs/altclip_contrastive.py with ``model.vision`` a ViT-B/32 (width 768, 12
                 layers, 12 heads, MLP 3072, 32 px patches, 224 px images); the recipe's text tower.
    altclip-l14  configs/altclip_contrastive.py: ViT-L/14 (frozen) + XLM-R large, bf16, AdamW, no remat.
    altclip-tiny configs/altclip_contrastive.py with the altclip-tiny preset (two narrow layers per
                 tower, the scenes tokenizer's vocabulary), for a quick check.
    demo         configs/demo.py (a tiny ALIGN; its BERT scans).

Offline stand-ins for what the recipes read from elsewhere: the embedded scenes dataset as the data
source (its images resized to the recipe's image size by the recipe's own preprocessing) and a
tokenizer built from its captions (``scenes`` for BERT, ``scenes-xlmr`` for XLM-R). The AltCLIP text
tower keeps XLM-R's 250,002-token vocabulary (the recipe takes the size of its checkpoint's
tokenizer), so the embedding table and its optimiser state are the real ones.

``--batch-size`` is per data-parallel device; the batch is one real batch of the recipe's input
pipeline, reused for every step. Each (model, layout) runs in a fresh process, so that no
compilation, cache or memory is shared; JAX's persistent compilation cache is off. Figures:

    compile      the step's trace, lowering and XLA compilation (``lower(state, batch).compile()``,
                 against the state's shapes and shardings, as ``altjax-train --dry-run`` compiles it)
    first step   the first call of the compiled step (buffers allocated for the first time)
    steady step  the median of the next ``--steps`` calls

Before the state is built, the compiled step's memory (its inputs, new outputs and temporaries, as
XLA states them) is compared with the memory available: a step that would not fit is reported as
such with its compile time, and not run. The figures are wall times on a possibly shared machine:
the load average is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
XLMR_VOCAB = 250_002
VIT_B32 = dict(image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072)
XLMR_TEXT = f"model.text={{'vocab_size': {XLMR_VOCAB}}}"
# (recipe, overrides, the towers with a scan_layers field).
MODELS = {
    "align-base": ("align_base.py", ["data.source=scenes", "data.tokenizer=scenes"], ("text", "vision")),
    "altclip-b32": ("altclip_contrastive.py", ["data.tokenizer=scenes-xlmr", XLMR_TEXT, f"model.vision={VIT_B32!r}"],
                    ("text", "vision")),
    "altclip-l14": ("altclip_contrastive.py", ["data.tokenizer=scenes-xlmr", XLMR_TEXT], ("text", "vision")),
    "altclip-tiny": ("altclip_contrastive.py", ["data.tokenizer=scenes-xlmr", "model.preset=altclip-tiny",
                                                "model.projection_dim=16"], ("text", "vision")),
    "demo": ("demo.py", [], ("text", "vision")),
}
# align-base is left out by default: on a 2-core CPU its two compilations and state builds alone take
# about 12 minutes, the two AltCLIPs together about 8.
DEFAULT_MODELS = ("altclip-b32", "altclip-l14")
LAYOUTS = ("unrolled", "scanned")


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run_overrides(model: str, scanned: bool, per_device: int) -> list[str]:
    """The overrides of ``model``'s recipe for a run with its towers' layers scanned or not and
    ``per_device`` examples per data-parallel device."""
    from altjax import sharding
    from altjax.train import load_config

    recipe, overrides, towers = MODELS[model]
    config = load_config(os.path.join(CONFIGS, recipe), overrides)
    batch_size = per_device * sharding.batch_size_divisor(sharding.make_mesh(**config.mesh))
    # A tower's override replaces its whole dict: the recipe's fields are carried over.
    fields = {tower: config.model[tower].to_dict() for tower in ("text", "vision")}
    for tower in towers:
        fields[tower]["scan_layers"] = scanned
    group = fields["vision"].get("bn_group_size")
    if group and batch_size % group:
        # align-base's BatchNorm takes its statistics per replica of 16 examples, more than a
        # benchmark's batch holds: here one group per device.
        fields["vision"]["bn_group_size"] = per_device
    changed = {f"model.{tower}": fields[tower] for tower in fields if fields[tower] != config.model[tower].to_dict()}
    return ([item for item in overrides if item.split("=", 1)[0] not in changed]
            + [f"{key}={value!r}" for key, value in changed.items()] + [f"batch_size={batch_size}"])


def measure(model: str, scanned: bool, per_device: int, steps: int) -> dict:
    """One (model, layout): build, compile and time the step in this process (see the module docstring)."""
    import tempfile

    import jax

    # A cache hit would time a load, not a compilation.
    jax.config.update("jax_enable_compilation_cache", False)

    from altjax import sharding
    from altjax.train import load_config
    from altjax.training import tasks
    from altjax.training.config import validate
    from altjax.training.loop import build_run, build_step
    from altjax.training.plan import abstract_run
    from altjax.training.step import process_batch_positions

    overrides = run_overrides(model, scanned, per_device)
    config = load_config(os.path.join(CONFIGS, MODELS[model][0]), overrides)
    validate(config)
    mesh = sharding.make_mesh(**config.mesh)
    row = {"model": model, "layout": "scanned" if scanned else "unrolled", "platform": jax.devices()[0].platform,
           "devices": jax.device_count(), "batch_size": int(config.batch_size), "overrides": overrides}
    with tempfile.TemporaryDirectory(prefix="altjax-compile-") as directory:
        start = time.perf_counter()
        parts, abstract, shardings = abstract_run(config, directory, mesh)
        pipeline = tasks.TASKS[config.task].pipeline(
            config, parts.processor, directory,
            process_batch_positions(mesh, int(config.batch_size), int(config.grad_accum_steps)))
        try:
            batch = sharding.shard_batch(next(pipeline), mesh)
        finally:
            pipeline.close()
        row["setup_s"] = time.perf_counter() - start

        start = time.perf_counter()
        lowered = build_step(config, parts, mesh, shardings).lower(abstract, batch)
        row["lower_s"] = time.perf_counter() - start
        compiled = lowered.compile()
        row["compile_s"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
        row["step_bytes"] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        device = jax.devices()[0]
        if device.platform == "cpu":
            available = H.available_bytes()
        else:
            available = (device.memory_stats() or {}).get("bytes_limit")
        if available and row["step_bytes"] > available:
            row["error"] = (f"does not fit: the step needs {H.fmt_bytes(row['step_bytes'])}, "
                            f"{H.fmt_bytes(available)} available")
            return row

        start = time.perf_counter()
        _, state = build_run(config, directory, mesh)
        # As the training loop does: the fresh state laid out in the shardings the step was compiled for.
        state = jax.block_until_ready(jax.jit(lambda s: s, out_shardings=shardings)(state))
        row["build_s"] = time.perf_counter() - start

    times = []
    for _ in range(1 + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    row.update(first_step_s=times[0], step_times=times[1:], step_s=statistics.median(times[1:]),
               loss=float(metrics["loss"]))
    return row


def spawn(model: str, layout: str, args) -> dict:
    """``measure`` in a fresh process; a failure or a kill comes back as the row's ``error``."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", model, layout,
               "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if os.environ.get("ALTJAX_BENCH_DEBUG"):
        print(proc.stderr, file=sys.stderr)
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        reason = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
    return {"model": model, "layout": layout, "error": reason}


def progress_line(row: dict) -> str:
    head = f"{row['model']} {row['layout']}: "
    parts = [f"{label} {row[key]:.1f} s" for key, label in
             (("setup_s", "setup"), ("compile_s", "compile"), ("build_s", "state built")) if key in row]
    if "first_step_s" in row:
        parts += [f"first step {row['first_step_s']:.2f} s",
                  f"steady {row['step_s']:.2f} s (steps {', '.join(f'{t:.2f}' for t in row['step_times'])})",
                  f"loss {row['loss']:.4f}"]
    if "step_bytes" in row:
        parts.append(f"step memory {H.fmt_bytes(row['step_bytes'])}")
    if "error" in row:
        parts.append(row["error"])
    return head + ", ".join(parts)


def _seconds(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def table(rows: list[dict], models: list[str]) -> list[str]:
    """Compile, first step and steady step, unrolled | scanned | unrolled / scanned, one line per model."""
    figures = (("compile_s", "compile s"), ("first_step_s", "first step s"), ("step_s", "steady step s"))
    width = max(len(m) for m in models + ["model"]) + 2
    lines = [" " * width + "".join(f"{title:^26}  " for _, title in figures),
             f"{'model':<{width}}" + f"{'unrolled':>9}{'scanned':>9}{'ratio':>8}  " * len(figures)]
    by_key = {(r["model"], r["layout"]): r for r in rows}
    for model in models:
        unrolled, scanned = by_key[(model, "unrolled")], by_key[(model, "scanned")]
        cells = []
        for key, _ in figures:
            a, b = unrolled.get(key), scanned.get(key)
            ratio = f"{a / b:.2f}x" if a and b else "-"
            cells.append(f"{_seconds(a):>9}{_seconds(b):>9}{ratio:>8}  ")
        lines.append(f"{model:<{width}}" + "".join(cells))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)} (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per data-parallel device")
    parser.add_argument("--steps", type=int, default=3, help="steps after the first; the steady time is their median")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        parser.error("--batch-size and --steps must be at least 1")

    if args.worker:
        model, layout = args.worker
        print(json.dumps(measure(model, layout == "scanned", args.batch_size, args.steps)))
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {', '.join(unknown) or 'empty'}; choose from {', '.join(MODELS)}")
    start_load, started = load(), time.perf_counter()
    print(f"compile: training steps of {', '.join(models)}, layers unrolled vs scanned; batch {args.batch_size} "
          f"per device, steady = median of {args.steps} steps after the first; {H.hardware()}, "
          f"{datetime.date.today().isoformat()}")
    print(H.versions())
    print(f"load average (1/5/15 min) at start: {start_load}", flush=True)
    rows = []
    for model in models:
        for layout in LAYOUTS:
            row = spawn(model, layout, args)
            rows.append(row)
            print(progress_line(row), flush=True)
    end_load = load()
    print(f"platform {next((r['platform'] for r in rows if 'platform' in r), '?')}, "
          f"wall time {time.perf_counter() - started:.0f} s; ratio = unrolled / scanned")
    print("\n".join(table(rows, models)))
    print(f"load average (1/5/15 min) at end: {end_load}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "compile", "date": datetime.date.today().isoformat(), "command": " ".join(
                ["python"] + sys.argv), "hardware": H.hardware(), "versions": H.versions(),
                "batch_size_per_device": args.batch_size, "steps": args.steps, "load_start": start_load,
                "load_end": end_load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
