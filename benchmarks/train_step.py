"""One training step of altjax against transformers' PyTorch model: time, throughput, memory, FLOPs, MFU.

    python benchmarks/train_step.py --model demo                       # the demo ALIGN, batch 64
    python benchmarks/train_step.py --model align-base --batch-size 2 --repeats 3 --variants jax-fp32,torch-fp32
    python benchmarks/train_step.py --model altclip-l14 --batch-size 128 --repeats 20 \\
        --variants jax-bf16,jax-bf16-scan,jax-bf16-scan-remat,torch-bf16,torch-compile-bf16   # on a GPU

On a bare CUDA machine (both frameworks on the one GPU, JAX without preallocation):

    pip install -e . "jax[cuda12]" torch==2.13.0 transformers==5.23.0    # torch's default wheel is CUDA
    python benchmarks/train_step.py --model altclip-l14 --batch-size 128 --repeats 20 --json l14.json
    python benchmarks/embed.py --model altclip-l14 --batch-size 256 --repeats 20 --json l14-embed.json

A step is the forward of both towers, the model's contrastive loss (ALIGN: label-smoothed softmax
over logits / temperature; AltCLIP: CLIP's symmetric cross-entropy over logits * exp(logit_scale)),
the backward and an AdamW update of every parameter (lr 1e-4, weight decay 0.01, PyTorch's
defaults otherwise; torch.optim.AdamW(foreach=True) vs optax.adamw), in training mode (dropout and
BatchNorm batch statistics as the config sets them), on the same random batch (same size, image
resolution, text length and precision on both sides; random weights, each framework its own).

Variants (``--variants``, comma-separated): ``jax-fp32``, ``jax-bf16`` (bf16 compute, fp32
parameters), each with ``-scan`` (``scan_layers`` on in every tower that has it: BERT, XLM-R and
the CLIP ViT run their stacked layers under ``nnx.scan``, so XLA compiles one layer per tower;
EfficientNet stays unrolled), ``-remat`` (every transformer layer and MBConv block rematerialised on
its own, policy nothing_saveable, by ``altjax.models.stack.set_remat`` as a training run with
``remat`` does) and, for ALIGN, ``-grouped``/``-shifted`` (EfficientNet's depthwise convolution as
XLA's grouped convolution / as fused shifted multiply-adds; default: shifted on CPU, grouped
elsewhere), e.g. ``jax-bf16-scan-remat``; ``torch-fp32`` (eager), ``torch-bf16`` (eager under
torch.autocast bf16), ``torch-compile-fp32``, ``torch-compile-bf16``. A variant that fails to build
or compile is reported with its reason.

The compile column is, for altjax, the step's trace, lowering and XLA compilation
(``lower().compile()``); for torch.compile, its first call (compilation and one step).

Each variant runs in its own process (its peak memory is its own: the allocator's peak on GPU,
peak RSS on CPU, which includes the ~0.3-0.6 GB of the framework itself). When they fit in memory
together they are timed in alternation, one step each per round; otherwise one after the other
(``--alternate`` / ``--sequential`` force either). Figures are medians over ``--repeats`` steps
after ``--warmup`` steps. The ratio is altjax's throughput over PyTorch's (above 1: altjax is
faster), each altjax variant against PyTorch eager in the same precision.

FLOPs per step come from XLA's cost analysis of the compiled altjax step (fp32, no remat, so
recomputation is not counted as useful work), cross-checked with PyTorch's FlopCounterMode on the
same step and with an analytic count of the transformer towers' matmuls (see
``_harness.analytic_flops``). MFU = FLOPs / step time / peak; the peak defaults to the H100 SXM's
dense bf16 989 TFLOP/s on GPU; on CPU only the achieved GFLOP/s is printed unless ``--peak-tflops``
is given.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

ALL_VARIANTS = ("jax-fp32", "jax-bf16", "jax-fp32-scan", "jax-bf16-scan", "jax-fp32-remat", "jax-bf16-remat",
                "torch-fp32", "torch-bf16", "torch-compile-fp32", "torch-compile-bf16")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=H.MODELS, default="demo")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 for demo/tiny, 2 otherwise")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 64 (ALIGN), 77 (AltCLIP), demo config's")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 for demo/tiny, 3 otherwise")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for MFU (default on GPU: H100 SXM dense bf16 "
                             f"{H.H100_BF16_DENSE_TFLOPS})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU cores per framework, each process pinned to the first N (default: all; 1: "
                             "single-threaded PyTorch and XLA without its Eigen pool, on one core)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--alternate", action="store_true", help="all variants alive, timed in turn")
    order.add_argument("--sequential", action="store_true", help="one variant after another")
    args = parser.parse_args(argv)

    small = args.model == "demo" or args.model.endswith("tiny")
    batch_size = args.batch_size or (64 if small else 2)
    repeats = args.repeats or (20 if small else 3)
    _, cfg, default_seq = H.configs(args.model)
    seq_len = args.seq_len or default_seq
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        H.parse_variant(name)
    gpu = H.on_gpu()
    peak = args.peak_tflops or (H.H100_BF16_DENSE_TFLOPS if gpu else None)

    params = H.param_count(args.model)
    # Parameters, gradients and two AdamW moments in fp32, and as much again for activations and
    # the framework: a rough bound to decide whether all workers fit at once.
    estimate = len(names) * params * 4 * 6
    alternate = args.alternate or (not args.sequential and (gpu or estimate < 0.5 * H.available_bytes()))
    count_flops = next((n for n in names if n.startswith("torch") and "compile" not in n), None)
    variants = []
    for name in names:
        spec = {**H.parse_variant(name), "kind": "train", "model": args.model, "batch_size": batch_size,
                "seq_len": seq_len, "warmup": args.warmup, "threads": args.threads,
                "count_flops": name == count_flops}
        variants.append((name, spec))

    print(f"train step: {args.model} ({params / 1e6:.1f}M parameters), batch {batch_size}, "
          f"{H.image_size(cfg)} px images, {seq_len} tokens, median of {repeats} steps "
          f"({'alternating' if alternate else 'one variant after another'}), {H.hardware()}, "
          f"{args.threads or os.cpu_count()} threads per framework")
    print(f"{H.versions()}, {datetime.date.today().isoformat()}")
    workers = H.run_workers(variants, ("step",), repeats, alternate=alternate)

    ok = {w.label: w for w in workers if w.info is not None}
    model_flops, source = _model_flops(ok, args.model, batch_size, seq_len)
    print(f"{'variant':<36}{'step':>10}{'pairs/s':>10}{'peak mem':>16}{'compile':>9}"
          f"{'TFLOP/s' if gpu else 'GFLOP/s':>9}{'MFU' if peak else '':>7}")
    for w in workers:
        label = H.describe(w.label)
        if w.info is None:
            print(f"{label:<36}skipped: {w.error}")
            continue
        t = w.median("step")
        kind, mem = w.info["memory"]
        rate = model_flops / t / (1e12 if gpu else 1e9) if model_flops else float("nan")
        mfu = f"{100 * model_flops / t / (peak * 1e12):6.1f}%" if peak and model_flops else ""
        compile_s = w.info.get("compile_s")
        print(f"{label:<36}{t * 1e3:>8.1f}ms{batch_size / t:>10.2f}{kind + ' ' + H.fmt_bytes(mem):>16}"
              f"{'' if compile_s is None else f'{compile_s:.1f}s':>9}{rate:>9.1f}{mfu:>7}")
    _print_flops(ok, args.model, batch_size, seq_len, model_flops, source)
    if args.json:
        H.write_json(args.json, {"kind": "train", "model": args.model, "batch_size": batch_size, "seq_len": seq_len,
                                 "threads": args.threads or os.cpu_count(), "date": datetime.date.today().isoformat(),
                                 "flops": model_flops, "flops_source": source, "peak_tflops": peak}, workers)
    for name, w in ok.items():
        spec = w.spec
        if spec["framework"] != "jax":
            continue
        ref = ok.get(f"torch-{spec['precision']}")
        if ref is None:
            continue
        ratio = ref.median("step") / w.median("step")
        print(f"ratio {H.describe(name)} / {H.describe(ref.label)}: {ratio:.2f}x throughput "
              f"({w.median('step') * 1e3:.1f} ms vs {ref.median('step') * 1e3:.1f} ms)")


def _model_flops(ok, model, batch_size, seq_len):
    """The useful FLOPs of one step: XLA's count of the plain altjax step, else PyTorch's counter,
    else the analytic count. A remat step's count includes the recomputation and a scanned step's
    goes through XLA's costing of a while loop: neither is used."""
    for name in ("jax-fp32", "jax-bf16"):
        if name in ok and ok[name].info["flops"].get("step"):
            return ok[name].info["flops"]["step"], f"XLA cost analysis ({name})"
    for w in ok.values():
        if w.spec["framework"] == "torch" and w.info.get("flops", {}).get("step"):
            return w.info["flops"]["step"], "PyTorch FlopCounterMode"
    analytic = H.analytic_flops(model, batch_size, seq_len, train=True)
    if analytic["vision"] is not None:
        return analytic["text"] + analytic["vision"], "analytic"
    return None, "none"


def _print_flops(ok, model, batch_size, seq_len, model_flops, source):
    parts = [f"FLOPs per step: {H.gflop(model_flops)} ({source})" if model_flops else "FLOPs per step: unknown"]
    for w in ok.values():
        f = w.info.get("flops", {}).get("step")
        if f and w.spec["framework"] == "torch":
            parts.append(f"PyTorch FlopCounterMode {H.gflop(f)}")
    analytic = H.analytic_flops(model, batch_size, seq_len, train=True)
    if analytic["vision"] is None:
        parts.append(f"analytic text tower {H.gflop(analytic['text'])} (EfficientNet: see FlopCounterMode)")
    else:
        parts.append(f"analytic matmuls {H.gflop((analytic['text'] + analytic['vision']))} "
                     f"(text {H.gflop(analytic['text'])}, vision {H.gflop(analytic['vision'])})")
    print("; ".join(parts))


if __name__ == "__main__":
    main()
