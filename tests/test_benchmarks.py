"""Smoke tests: the train-step, embedding and compile benchmarks (compile.py, compile_scan.py) run at a tiny size and print their
figures; the variant names parse; the GPU suite refuses to run without a GPU."""
import json
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
               "--warmup", "1", "--variants", "jax-fp32,jax-fp32-scan-remat,torch-fp32")
    ratio = re.search(r"ratio altjax fp32 / PyTorch eager fp32: ([0-9.]+)x throughput", out)
    assert ratio and float(ratio.group(1)) > 0, f"no ratio line in:\n{out}"
    xla = re.search(r"FLOPs per step: ([0-9.]+) G \(XLA cost analysis", out)
    torch_count = re.search(r"PyTorch FlopCounterMode ([0-9.]+) G", out)
    assert xla and torch_count, f"no FLOP counts in:\n{out}"
    assert "skipped" not in out, f"a variant was skipped:\n{out}"
    assert re.search(r"altjax fp32, scanned, remat +[0-9.]+ms", out), out


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


def _harness():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import _harness

    return _harness


@pytest.mark.parametrize("name", ["jax-fp16", "jax-scan", "jax-bf16-fp32", "jax-bf16-scan-scan", "torch-bf16-scan",
                                  "torch-compile-bf16-remat", "jax-fp32-grouped-shifted"])
def test_unknown_variant_is_an_error(name):
    with pytest.raises(ValueError, match="unknown variant"):
        _harness().parse_variant(name)


def test_variant_names():
    h = _harness()
    assert h.parse_variant("jax-bf16-remat") == {"framework": "jax", "precision": "bf16", "compile": False,
                                                 "remat": "nothing_saveable"}
    assert h.parse_variant("jax-bf16-scan") == {"framework": "jax", "precision": "bf16", "compile": False,
                                                "scan_layers": True}
    # The suffixes combine in any order.
    for name in ("jax-bf16-scan-remat", "jax-bf16-remat-scan"):
        assert h.parse_variant(name) == {"framework": "jax", "precision": "bf16", "compile": False,
                                         "scan_layers": True, "remat": "nothing_saveable"}
    assert h.describe("jax-fp32-scan-remat") == "altjax fp32, scanned, remat"
    assert h.describe("torch-compile-bf16") == "PyTorch torch.compile autocast bf16"


def test_scanned_turns_on_every_tower_that_scans():
    from altjax.models.align import AlignConfig
    from altjax.models.altclip import AltCLIPConfig

    align = _harness().scanned(AlignConfig.from_preset("align-tiny"))
    assert align.text_config.scan_layers and align.vision_config.scan_layers
    altclip = _harness().scanned(AltCLIPConfig.from_preset("altclip-tiny"))
    assert altclip.text_config.scan_layers and altclip.vision_config.scan_layers


def test_compile_benchmark_prints_and_writes_its_figures(tmp_path):
    out = _run("compile.py", "--models", "altclip-tiny", "--steps", "1", "--json", str(tmp_path / "compile.json"))
    for when in ("start", "end"):
        assert re.search(rf"load average \(1/5/15 min\) at {when}: [0-9.]+ [0-9.]+ [0-9.]+", out), out
    # The table's line: compile, first step and steady step, each unrolled, scanned and their ratio.
    cells = r" +([0-9.]+) +([0-9.]+) +([0-9.]+)x"
    assert re.search(r"^altclip-tiny" + cells * 3 + r" *$", out, re.MULTILINE), out
    with open(tmp_path / "compile.json") as f:
        result = json.load(f)
    assert [(r["model"], r["layout"]) for r in result["rows"]] == [("altclip-tiny", "unrolled"),
                                                                    ("altclip-tiny", "scanned")]
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["compile_s"] > 0 and row["first_step_s"] > 0 and row["step_s"] > 0, row
        assert row["step_bytes"] > 0 and len(row["step_times"]) == 1, row
    assert "scan_layers': True" in " ".join(result["rows"][1]["overrides"])


@pytest.mark.parametrize("model", ["altclip", "clip"])
def test_compile_scan_prints_each_phase_and_the_step(model):
    out = _run("compile_scan.py", "--model", model, "--layers", "2", "--repeats", "1", "--steps", "2")
    for phase in ("trace + lower", "compile", "total", "step"):
        assert re.search(rf"^{re.escape(phase)} +([0-9.]+) +([0-9.]+) +([0-9.]+)x$", out, re.MULTILINE), \
            f"no {phase!r} row:\n{out}"


def test_gpu_suite_refuses_to_run_without_a_gpu(tmp_path):
    # An nvidia-smi that finds no GPU, ahead of any real one on PATH: the suite must stop at once.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (stub / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ALTJAX_SUITE_CPU"}
    env["PATH"] = f"{stub}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc
    assert proc.stderr.startswith("gpu_suite.sh: no NVIDIA GPU found"), proc.stderr
    assert not (tmp_path / "out").exists()
