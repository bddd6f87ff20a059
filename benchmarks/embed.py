"""Inference throughput of altjax against transformers' PyTorch model: images/s and texts/s.

    python benchmarks/embed.py --model align-base --batch-size 8 --repeats 3 --variants jax-fp32,torch-fp32
    python benchmarks/embed.py --model altclip-l14 --batch-size 256 --repeats 20 \\
        --variants jax-bf16,torch-bf16,torch-compile-bf16                          # on a GPU

The image side times ``get_image_features(pixel_values)``, the text side
``get_text_features(input_ids, attention_mask, token_type_ids)`` (the projected features the
embedding CLI writes), in eval mode on the same random batch: altjax jitted (``jax-fp32``,
``jax-bf16``: bf16 compute, fp32 parameters; ``-scan``: layers scanned, as in
benchmarks/train_step.py), PyTorch under ``torch.no_grad()`` eager
(``torch-fp32``), with autocast bf16 (``torch-bf16``) or compiled (``torch-compile-fp32``,
``torch-compile-bf16``). Each variant runs in its own process (peak RSS on CPU, allocator peak
on GPU); timing, alternation and medians as in benchmarks/train_step.py. The ratio is altjax's
throughput over PyTorch eager's in the same precision. FLOPs per image and per text come from XLA's
cost analysis, with PyTorch's FlopCounterMode and the analytic transformer count beside them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

ALL_VARIANTS = ("jax-fp32", "jax-bf16", "torch-fp32", "torch-bf16", "torch-compile-fp32", "torch-compile-bf16")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=H.MODELS, default="demo")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 for demo/tiny, 8 otherwise")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 64 (ALIGN), 77 (AltCLIP), demo config's")
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 for demo/tiny, 3 otherwise")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for MFU (default on GPU: H100 SXM dense bf16 "
                             f"{H.H100_BF16_DENSE_TFLOPS})")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU cores per framework, each process pinned to the first N (default: all; 1: "
                             "single-threaded PyTorch and XLA without its Eigen pool, on one core)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--alternate", action="store_true")
    order.add_argument("--sequential", action="store_true")
    args = parser.parse_args(argv)

    small = args.model == "demo" or args.model.endswith("tiny")
    batch_size = args.batch_size or (64 if small else 8)
    repeats = args.repeats or (20 if small else 3)
    _, cfg, default_seq = H.configs(args.model)
    seq_len = args.seq_len or default_seq
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        spec = H.parse_variant(name)
        if "remat" in spec:
            raise SystemExit(f"{name}: remat is a training option")
    gpu = H.on_gpu()
    peak = args.peak_tflops or (H.H100_BF16_DENSE_TFLOPS if gpu else None)
    params = H.param_count(args.model)
    estimate = len(names) * params * 4 * 2
    alternate = args.alternate or (not args.sequential and (gpu or estimate < 0.5 * H.available_bytes()))
    count_flops = next((n for n in names if n.startswith("torch") and "compile" not in n), None)
    variants = [(n, {**H.parse_variant(n), "kind": "embed", "model": args.model, "batch_size": batch_size,
                     "seq_len": seq_len, "warmup": args.warmup, "threads": args.threads,
                     "count_flops": n == count_flops}) for n in names]

    print(f"embed: {args.model} ({params / 1e6:.1f}M parameters), batch {batch_size}, {H.image_size(cfg)} px "
          f"images, {seq_len} tokens, median of {repeats} calls "
          f"({'alternating' if alternate else 'one variant after another'}), {H.hardware()}, "
          f"{args.threads or os.cpu_count()} threads per framework")
    print(f"{H.versions()}, {datetime.date.today().isoformat()}")
    workers = H.run_workers(variants, ("image", "text"), repeats, alternate=alternate)
    ok = {w.label: w for w in workers if w.info is not None}

    flops = {}
    for what in ("image", "text"):
        flops[what] = next((w.info["flops"][what] for n, w in ok.items()
                            if n.startswith("jax") and w.info["flops"].get(what)), None) or \
            next((w.info["flops"][what] for w in ok.values() if w.info.get("flops", {}).get(what)), None)
    unit = "TFLOP/s" if gpu else "GFLOP/s"
    print(f"{'variant':<32}{'image batch':>12}{'images/s':>10}{'text batch':>12}{'texts/s':>10}"
          f"{'peak mem':>16}{'img ' + unit:>13}{'MFU' if peak else '':>7}")
    for w in workers:
        label = H.describe(w.label)
        if w.info is None:
            print(f"{label:<32}skipped: {w.error}")
            continue
        ti, tt = w.median("image"), w.median("text")
        kind, mem = w.info["memory"]
        rate = flops["image"] / ti / (1e12 if gpu else 1e9) if flops["image"] else float("nan")
        mfu = f"{100 * flops['image'] / ti / (peak * 1e12):6.1f}%" if peak and flops["image"] else ""
        print(f"{label:<32}{ti * 1e3:>10.1f}ms{batch_size / ti:>10.2f}{tt * 1e3:>10.1f}ms{batch_size / tt:>10.2f}"
              f"{kind + ' ' + H.fmt_bytes(mem):>16}{rate:>13.1f}{mfu:>7}")
    if args.json:
        H.write_json(args.json, {"kind": "embed", "model": args.model, "batch_size": batch_size, "seq_len": seq_len,
                                 "threads": args.threads or os.cpu_count(), "date": datetime.date.today().isoformat(),
                                 "flops": flops}, workers)
    analytic = H.analytic_flops(args.model, batch_size, seq_len, train=False)
    torch_counts = next((w.info["flops"] for w in ok.values() if w.spec["framework"] == "torch"
                         and w.info.get("flops")), {})
    for what, key in (("image", "vision"), ("text", "text")):
        parts = [f"{what} FLOPs per batch: XLA {H.gflop(flops[what])}" if flops[what] else f"{what} FLOPs: unknown"]
        if torch_counts.get(what):
            parts.append(f"PyTorch FlopCounterMode {H.gflop(torch_counts[what])}")
        if analytic[key] is not None:
            parts.append(f"analytic matmuls {H.gflop(analytic[key])}")
        print("; ".join(parts))
    for name, w in ok.items():
        if w.spec["framework"] != "jax":
            continue
        ref = ok.get(f"torch-{w.spec['precision']}")
        if ref is None:
            continue
        print(f"ratio {H.describe(name)} / {H.describe(ref.label)}: "
              f"images {ref.median('image') / w.median('image'):.2f}x, "
              f"texts {ref.median('text') / w.median('text'):.2f}x throughput")


if __name__ == "__main__":
    main()
