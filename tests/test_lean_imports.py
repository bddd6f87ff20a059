"""Training from WebDataset shards and evaluating on image folders import neither
tensorflow_datasets nor torch.

Both are installed here (the scenes dataset is a tfds dataset; the parity tests run transformers'
torch models), so nothing fails when one is imported where it is not needed: a run only starts
slower and takes more memory. This test runs ``altjax-train`` on WebDataset shards, reads the
sources of TFRecord and ArrayRecord files as such a run does, then ``altjax-eval`` zero-shot and
retrieval on image folders, in a fresh process that records who imports either module first, and
names that import chain when one does.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from altjax.data import example, scenes, sources, tfrecord, tokenizers, webdataset

WATCHED = ("tensorflow_datasets", "torch")

# A tiny ALIGN (one EfficientNet stage, a one-layer BERT of width 16) on 16 px crops, 2 steps on 2
# simulated devices; its exported model/ is what the evaluations read.
TINY = [
    "total_steps=2", "batch_size=4", "log_every=1", "checkpoint_every=2", "keep_checkpoints=1",
    "eval_every=0", "eval.at_start=false", "eval.at_end=false", "async_checkpoints=false",
    "model.projection_dim=16",
    "model.text={'vocab_size': -1, 'hidden_size': 16, 'num_hidden_layers': 1, 'num_attention_heads': 2, "
    "'intermediate_size': 32, 'max_position_embeddings': 16}",
    "model.vision={'image_size': 16, 'width_coefficient': 1.0, 'depth_coefficient': 1.0, 'kernel_sizes': (3,), "
    "'in_channels': (32,), 'out_channels': (16,), 'strides': (1,), 'num_block_repeats': (1,), "
    "'expand_ratios': (1,), 'hidden_dim': 16, 'drop_connect_rate': 0.0, 'bn_group_size': None}",
    "data.source=webdataset", "data.image_key=jpg", "data.caption_key=txt", "data.max_length=16",
    "data.num_threads=1", "optimizer.warmup_steps=1",
]

# Run in the child: a meta path finder sees every import attempt before the real finders do.
# Probes through importlib.util.find_spec (transformers asks whether torch is installed) import
# nothing, so only attempts from an import statement or importlib.import_module are recorded.
CHILD = r"""
import importlib.abc, json, sys, traceback

WATCHED, TRAIN_ARGS, RECORD_FILES, EVAL_ARGS = json.loads(sys.argv[1])
attempts = {}


class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in WATCHED and name not in sys.modules and name not in attempts:
            frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]
                      if "importlib" not in f.filename]
            if not any("importlib.util" in f.filename for f in traceback.extract_stack()):
                attempts[name] = frames
        return None


sys.meta_path.insert(0, Recorder())


def imported():
    return {name: attempts.get(name, ["(no import statement recorded)"]) for name in WATCHED if name in sys.modules}


from altjax import train
from altjax.data.builders import source_from_config
from altjax.evaluation.cli import eval_main

report = {"train_status": train.main(TRAIN_ARGS)}
# A run on TFRecord or ArrayRecord files differs from the one above only in its source.
for kind, path in RECORD_FILES.items():
    data = train.load_config("demo", [f"data.source={kind}", f"data.files={path}"]).data
    report[kind] = sorted(source_from_config(data, "train", "caption", None)[0])
report["train"] = imported()
report["eval_status"] = [eval_main(args) for args in EVAL_ARGS]
report["eval"] = imported()
print("REPORT " + json.dumps(report))
"""


def _chain(frames):
    """The import chain from the first altjax frame on, with site-packages paths shortened."""
    start = next((i for i, f in enumerate(frames) if f"{os.sep}altjax{os.sep}" in f), 0)
    return "\n  ".join(f.split("site-packages" + os.sep)[-1] for f in frames[start:])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 scenes as a WebDataset shard, a TFRecord and an ArrayRecord file; a tokenizer directory;
    a class-per-folder set and a folder with a captions file."""
    root = tmp_path_factory.mktemp("lean")
    samples = []
    for i in range(16):
        scene = scenes.generate_example(0, "train", i, 16)
        samples.append({"__key__": f"{i:06d}", "jpg": scenes.encode_jpeg(scene["image"]), "txt": scene["caption_en"]})
    webdataset.write_shard(root / "shard-0.tar", samples)
    examples = [example.encode_example({"image": s["jpg"], "caption": s["txt"]}) for s in samples]
    tfrecord.write_tfrecord(root / "pairs.tfrecord", examples)
    sources.write_array_record(root / "pairs.array_record", examples)
    lines = []
    for i, (name, colour) in enumerate((("red_square", (220, 30, 30)), ("blue_star", (30, 60, 220)))):
        for j in range(2):
            image = Image.fromarray(np.full((20, 20, 3), colour, np.uint8))
            os.makedirs(root / "shapes" / name, exist_ok=True)
            image.save(root / "shapes" / name / f"{j}.png")
            os.makedirs(root / "photos", exist_ok=True)
            image.save(root / "photos" / f"{name}{j}.png")
            lines.append(json.dumps({"image": f"{name}{j}.png", "captions": [f"a {name.replace('_', ' ')}"]}))
    (root / "photos" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    # A tokenizer directory, as a run on real data names one (not the tokenizer built from scenes).
    tokenizers.scenes_word_tokenizer(str(root / "vocab"), "en").save_pretrained(str(root / "tokenizer"))
    return root


def test_training_on_webdataset_and_evaluating_on_folders_import_neither_tfds_nor_torch(data, tmp_path):
    workdir = tmp_path / "run"
    train_args = ["--config", "demo", "--workdir", str(workdir), f"--config.data.files={data}/shard-*.tar",
                  f"--config.data.tokenizer={data}/tokenizer"]
    train_args += [f"--config.{o}" for o in TINY]
    model = str(workdir / "model")
    eval_args = [["--checkpoint", model, "--task", "zeroshot", "--dataset", str(data / "shapes"), "--templates", "en",
                  "--batch-size", "4", "--output", str(tmp_path / "zeroshot.json")],
                 ["--checkpoint", model, "--task", "retrieval", "--dataset", str(data / "photos"),
                  "--batch-size", "4", "--output", str(tmp_path / "retrieval.json")]]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    records = {"tfrecord": str(data / "pairs.tfrecord"), "array_record": str(data / "pairs.array_record")}
    process = subprocess.run([sys.executable, "-c", CHILD, json.dumps([WATCHED, train_args, records, eval_args])],
                             env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in process.stdout.splitlines() if line.startswith("REPORT ")]
    assert process.returncode == 0 and lines, (
        f"the child exited with status {process.returncode}\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}")
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["train_status"] == 0 and report["eval_status"] == [0, 0], (
        f"exit statuses: train {report['train_status']}, eval {report['eval_status']}\n{process.stderr[-3000:]}")
    for kind in records:
        assert report[kind] == ["caption", "image"], f"{kind}: first record's fields {report[kind]}"
    problems = [f"{phase}: {name} imported by\n  {_chain(frames)}"
                for phase in ("train", "eval") for name, frames in report[phase].items()
                if phase == "train" or name not in report["train"]]
    assert not problems, "\n".join(problems)
