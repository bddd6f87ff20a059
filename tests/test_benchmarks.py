"""Smoke tests: the train-step and embedding benchmarks run at a tiny size and print their ratios and FLOPs."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_train_step_prints_ratio_and_flops():
    # The tiny AltCLIP compiles faster than the demo ALIGN (whose depthwise convolutions unroll on CPU).
    out = _run("train_step.py", "--model", "altclip-tiny", "--batch-size", "2", "--seq-len", "8", "--repeats", "2",
               "--warmup", "1", "--variants", "jax-fp32,torch-fp32")
    ratio = re.search(r"ratio altjax fp32 / PyTorch eager fp32: ([0-9.]+)x throughput", out)
    assert ratio and float(ratio.group(1)) > 0, f"no ratio line in:\n{out}"
    xla = re.search(r"FLOPs per step: ([0-9.]+) G \(XLA cost analysis", out)
    torch_count = re.search(r"PyTorch FlopCounterMode ([0-9.]+) G", out)
    assert xla and torch_count, f"no FLOP counts in:\n{out}"
    assert "skipped" not in out, f"a variant was skipped:\n{out}"


def test_embed_prints_ratio():
    out = _run("embed.py", "--model", "altclip-tiny", "--batch-size", "2", "--seq-len", "8", "--repeats", "2",
               "--variants", "jax-fp32,torch-fp32")
    assert re.search(r"ratio altjax fp32 / PyTorch eager fp32: images [0-9.]+x, texts [0-9.]+x", out), out
    # The image tower's FLOPs are matmuls (ViT): the analytic count is within 10% of XLA's, which
    # also counts the elementwise work (layer norms, softmax, activations). The tiny text tower's
    # are dominated by that elementwise work, so only the line's presence is checked for it.
    for what in ("image", "text"):
        m = re.search(rf"{what} FLOPs per batch: XLA ([0-9.]+) G;.*analytic matmuls ([0-9.]+) G", out)
        assert m, f"no {what} FLOP line in:\n{out}"
        if what == "image":
            xla, analytic = float(m.group(1)), float(m.group(2))
            assert abs(xla - analytic) <= 0.1 * xla, f"image FLOPs: XLA {xla} G vs analytic {analytic} G"


def test_unknown_variant_is_an_error():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _harness

    with pytest.raises(ValueError, match="unknown variant"):
        _harness.parse_variant("jax-fp16")
    assert _harness.parse_variant("jax-bf16-remat") == {"framework": "jax", "precision": "bf16", "compile": False,
                                                         "remat": "nothing_saveable"}
