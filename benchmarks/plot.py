"""Bar chart of the benchmarks' throughput ratios (altjax / PyTorch eager, same precision) from their JSON files.

    python benchmarks/train_step.py --model demo --json /tmp/demo.json   # ... one file per run
    python benchmarks/plot.py /tmp/*.json --out benchmarks/performance_cpu.png

One bar per altjax variant and run (train step: pairs/s; embed: images/s and texts/s), drawn
with PIL on a log scale from a line at 1 (parity); right of it altjax is faster.
"""
from __future__ import annotations

import argparse
import json
import math

from PIL import Image, ImageDraw, ImageFont


def bars(results: list[dict]) -> list[tuple[str, float]]:
    """``(label, ratio)`` for every altjax row with a PyTorch eager row of the same precision."""
    out = []
    for r in results:
        rows = {row["variant"]: row for row in r["rows"] if row.get("medians")}
        for name, row in rows.items():
            if not name.startswith("jax"):
                continue
            ref = rows.get("torch-" + ("bf16" if "bf16" in name else "fp32"))
            if ref is None:
                continue
            whats = ("step",) if r["kind"] == "train" else ("image", "text")
            for what in whats:
                ratio = ref["medians"][what] / row["medians"][what]
                suffix = "" if what == "step" else f" {what}s"
                threads = f", {r['threads']} thr" if r.get("threads") else ""
                out.append((f"{r['kind']} {r['model']} b{r['batch_size']}{threads}: {row['label']}{suffix}", ratio))
    return out


def draw(items: list[tuple[str, float]], title: str, path: str) -> None:
    font = ImageFont.load_default()
    label_w, bar_w, row_h, top = 520, 420, 22, 40
    width, height = label_w + bar_w + 80, top + row_h * len(items) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black", font=font)
    # Log scale, so that 0.5x and 2x are as far from parity and small and large ratios both show.
    hi = max([2.0] + [r for _, r in items]) * 1.2
    lo = min([0.5] + [r for _, r in items]) / 1.2
    x0 = label_w

    def x(v):
        return x0 + int(bar_w * math.log(v / lo) / math.log(hi / lo))

    for i, (label, ratio) in enumerate(items):
        y = top + i * row_h
        d.text((10, y + 4), label, fill="black", font=font)
        d.rectangle([min(x(1.0), x(ratio)), y + 3, max(x(1.0), x(ratio)), y + row_h - 3], fill=(46, 134, 193) if ratio >= 1 else (220, 120, 60))
        d.text((max(x(1.0), x(ratio)) + 4, y + 4), f"{ratio:.2f}x", fill="black", font=font)
    d.line([x(1.0), top - 4, x(1.0), top + row_h * len(items)], fill="black", width=1)
    d.text((x(1.0) - 30, top + row_h * len(items) + 6), "1 = parity; right: altjax faster (log scale)", fill="black", font=font)
    img.save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", default="benchmarks/performance_cpu.png")
    args = parser.parse_args(argv)
    results = []
    for path in args.files:
        with open(path) as f:
            results.append(json.load(f))
    items = bars(results)
    hw = results[0]["hardware"] if results else ""
    draw(items, f"altjax / PyTorch eager throughput, same precision ({hw})", args.out)
    print(f"wrote {args.out} ({len(items)} bars)")


if __name__ == "__main__":
    main()
