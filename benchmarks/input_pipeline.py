"""Input pipeline throughput: images/s per core for the embedded scenes dataset and for WebDataset
tar shards of JPEGs, each with the evaluation transform and a random-crop training transform.

Usage: python benchmarks/input_pipeline.py [--repeats 5] [--batches 20] [--batch-size 64]

"per core" is measured with one decoding thread and no prefetching, on one core; "all cores"
uses as many decoding threads as there are cores (and a prefetch thread), and is divided by the
core count for its per-core figure. Each figure is the median over ``--repeats`` runs of
``--batches`` batches after two warm-up batches. Also times the generation of the default
64 px scenes dataset (12,000 examples) into a temporary directory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from altjax.data import pipeline, preprocess, scenes, sources, webdataset


def _tokenizer(directory: str):
    """A BERT WordPiece tokenizer whose vocabulary covers the scenes captions (no download)."""
    from transformers import BertTokenizerFast

    path = os.path.join(directory, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + scenes.vocabulary("en")) + "\n")
    return BertTokenizerFast(vocab_file=path)


def _write_shards(directory: str, count: int, image_size: int, per_shard: int = 250) -> list[str]:
    """WebDataset shards of scenes rendered at ``image_size`` px as JPEG, with .txt and .json captions."""
    paths = []
    for start in range(0, count, per_shard):
        rows = []
        for i in range(start, min(count, start + per_shard)):
            example = scenes.generate_example(1, "train", i, image_size)
            rows.append({"__key__": f"{i:09d}", "jpg": scenes.encode_jpeg(example["image"]),
                         "txt": example["caption_en"], "json": {"caption": example["caption_en"]}})
        path = os.path.join(directory, f"{start // per_shard:05d}.tar")
        webdataset.write_shard(path, rows)
        paths.append(path)
    return paths


def _throughput(make_source, make_pipeline, batches: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        with make_pipeline(make_source()) as p:
            for _ in range(2):
                next(p)
            start = time.perf_counter()
            images = sum(next(p)["pixel_values"].shape[0] for _ in range(batches))
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-generation", action="store_true", help="do not time the default dataset's generation")
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_generation:
            start = time.perf_counter()
            scenes.prepare(data_dir=os.path.join(tmp, "default"))
            print(f"generating the default altjax_scenes (64 px, 12,000 examples): {time.perf_counter() - start:.1f} s")
        tokenizer = _tokenizer(tmp)
        data_dir = os.path.join(tmp, "tfds")
        scenes_config = scenes.scenes_config(num_train=2048, num_validation=64, num_test=64)
        scenes.prepare(scenes_config, data_dir=data_dir)
        shards = _write_shards(tmp, 1000, 256)
        cases = [
            ("scenes 64 px -> 64", lambda: scenes.source("train", data_dir=data_dir, config=scenes_config),
             preprocess.align_image_config(64)),
            ("webdataset JPEG 256 px -> 224", lambda: sources.WebDatasetSource(shards),
             preprocess.clip_image_config(224)),
        ]
        print(f"images/s, median of {args.repeats} runs of {args.batches} batches of {args.batch_size}, {cores} cores")
        print(f"{'data':32s} {'transform':20s} {'per core':>9s} {'all cores':>10s} {'/core':>7s}")
        for name, make_source, config in cases:
            for augment in (None, "random_resized_crop"):
                transform = preprocess.ImageTransform(config, augment)
                figures = []
                for threads, prefetch in ((1, 0), (cores, 2)):
                    def make_pipeline(source, threads=threads, prefetch=prefetch):
                        return pipeline.InputPipeline(
                            source, batch_size=args.batch_size, image=transform,
                            texts=preprocess.TextField(tokenizer, max_length=32), seed=0, num_threads=threads,
                            prefetch=prefetch)
                    figures.append(_throughput(make_source, make_pipeline, args.batches, args.repeats))
                label = augment or "eval (resize+crop)"
                print(f"{name:32s} {label:20s} {figures[0]:9.0f} {figures[1]:10.0f} {figures[1] / cores:7.0f}")


if __name__ == "__main__":
    main()
