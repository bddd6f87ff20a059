"""Shared machinery of benchmarks/train_step.py and benchmarks/embed.py.

Every variant (a framework, a precision, scanned layers, remat or torch.compile) runs in its own
worker process, so that its peak memory (RSS on CPU, the allocator's peak on GPU) is its own. The
parent drives the workers over pipes: when they fit in memory together they are all alive and
timed in turn, one call each per round (alternating, so a slow period of a shared machine hits
every variant alike); otherwise they run one after the other. Only one worker computes at a time,
and each uses all the cores.
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any, Optional

import numpy as np

MODELS = ("demo", "align-tiny", "align-base", "altclip-tiny", "altclip-b32", "altclip-l14")
# Default text lengths: ALIGN's tokenizer max_length 64, CLIP's context 77; the demo's from its config.
DEFAULT_SEQ = {"align-tiny": 16, "align-base": 64, "altclip-tiny": 16, "altclip-b32": 77, "altclip-l14": 77}
H100_BF16_DENSE_TFLOPS = 989.0


def on_gpu() -> bool:
    """Whether a CUDA device is visible to PyTorch (the workers then put both frameworks on it)."""
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# Models and batches


def configs(name: str):
    """``(family, altjax config, seq_len default)`` of a benchmark model name."""
    if name == "demo":
        from altjax.train import load_config
        from altjax.training.tasks.align import model_config

        config = load_config("demo")
        return "align", model_config(config, 100), int(config.data.max_length)
    if name.startswith("align"):
        from altjax.models.align import AlignConfig

        return "align", AlignConfig.from_preset(name), DEFAULT_SEQ[name]
    from altjax.models.altclip import AltCLIPConfig

    preset = {"altclip-l14": "altclip", "altclip-b32": "altclip-b32", "altclip-tiny": "altclip-tiny"}[name]
    return "altclip", AltCLIPConfig.from_preset(preset), DEFAULT_SEQ[name]


def scanned(cfg):
    """``cfg`` with ``scan_layers`` on in every tower config that has the field (every tower:
    BERT, XLM-R, the CLIP ViT, EfficientNet)."""
    from altjax.model_io.pretrained import with_scan_layers

    return with_scan_layers(cfg, True)[0]


def image_size(cfg) -> int:
    return int(cfg.vision_config.image_size)


def make_batch(cfg, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random pixels (NHWC) and captions of random lengths (at least half the length) padded with 0s
    under a mask; ids start at 5, above every special token of BERT and XLM-R."""
    rng = np.random.default_rng(seed)
    size = image_size(cfg)
    vocab = int(cfg.text_config.vocab_size)
    lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, (batch_size, 1))
    mask = (np.arange(seq_len)[None] < lengths).astype(np.int64)
    return {"pixel_values": rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
            "input_ids": rng.integers(5, vocab, (batch_size, seq_len)) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((batch_size, seq_len), np.int64)}


def param_count(name: str) -> int:
    """Parameters of the model, from shapes only (nothing allocated)."""
    import jax
    from flax import nnx

    family, cfg, _ = configs(name)
    model_cls = _jax_model_class(family)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _jax_model_class(family: str):
    from altjax.models import registry

    return registry.get(family).model


def _torch_model(family: str, cfg):
    import transformers

    from altjax.models import registry

    config = cfg.to_hf()
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    return getattr(transformers, registry.get(family).transformers_class)(hf_config)


# ----------------------------------------------------------------------------------------------
# FLOPs


def analytic_flops(name: str, batch_size: int, seq_len: int, *, train: bool) -> dict[str, Optional[float]]:
    """Matmul FLOPs per tower from the config: for a transformer, 2 x tokens x (4 d^2 + 2 d ff) per
    layer for the projections and MLP plus 4 x s^2 x d per layer and example for the two attention
    products, the patch embedding and the projection heads; training is 3 x forward (the backward
    computes the gradients of inputs and weights, each a forward's worth). EfficientNet is None:
    its convolutions are counted by PyTorch's FlopCounterMode in the PyTorch worker instead."""
    family, cfg, _ = configs(name)
    factor = 3.0 if train else 1.0

    def transformer(layers, d, ff, tokens):
        per_layer = 2 * batch_size * tokens * (4 * d * d + 2 * d * ff) + 4 * batch_size * tokens ** 2 * d
        return layers * per_layer

    t = cfg.text_config
    text = transformer(t.num_hidden_layers, t.hidden_size, t.intermediate_size, seq_len)
    if family == "align":
        # BERT's pooler is unused by ALIGN (it takes the CLS hidden state); the text projection is
        # d x projection_dim on one token per example.
        text += 2 * batch_size * t.hidden_size * cfg.projection_dim
        vision = None
    else:
        # XLM-R pooler-free head: pre-LN and transformation Linear(d, project_dim), then the
        # text projection; ViT: patches as a matmul, the CLS token's visual projection.
        text += 2 * batch_size * t.hidden_size * t.project_dim + 2 * batch_size * t.project_dim * cfg.projection_dim
        v = cfg.vision_config
        patches = (v.image_size // v.patch_size) ** 2
        vision = transformer(v.num_hidden_layers, v.hidden_size, v.intermediate_size, patches + 1)
        vision += 2 * batch_size * patches * 3 * v.patch_size ** 2 * v.hidden_size
        vision += 2 * batch_size * v.hidden_size * cfg.projection_dim
    return {"text": factor * text, "vision": None if vision is None else factor * vision}


def xla_flops(compiled) -> Optional[float]:
    """FLOPs of a compiled executable from XLA's cost analysis (None where the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


# ----------------------------------------------------------------------------------------------
# Workers


def _peak_memory(framework: str) -> tuple[str, int]:
    if framework == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and "peak_bytes_in_use" in stats:
            return "device", int(stats["peak_bytes_in_use"])
    else:
        import torch

        if torch.cuda.is_available():
            return "device", int(torch.cuda.max_memory_allocated())
    return "RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _setup_env() -> None:
    # Both frameworks share the GPU: JAX must not take 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def serve(conn, spec: dict) -> None:
    """Worker main loop: build the variant, answer ``("run", what)`` with seconds, ``"memory"``
    with the peak memory, ``"stop"`` by exiting. Setup errors are sent back, not raised."""
    _setup_env()
    threads = spec.get("threads") or os.cpu_count()
    if threads < (os.cpu_count() or 1) and hasattr(os, "sched_setaffinity"):
        # Pinned to the first `threads` cores (both frameworks the same ones; they run in turn):
        # XLA:CPU keeps worker threads of its own even with its Eigen pool off, so a thread count
        # alone let the JAX side use two cores under --threads 1.
        os.sched_setaffinity(0, set(range(threads)))
    if spec["framework"] == "jax" and threads == 1:
        # XLA:CPU has no thread-count setting between one and all cores: one means no Eigen pool.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    try:
        if spec["framework"] == "torch":
            import torch

            torch.set_num_threads(threads)
        start = time.perf_counter()
        runner, info = (_build_jax if spec["framework"] == "jax" else _build_torch)(spec)
        info["setup_s"] = time.perf_counter() - start
        for what in runner:
            for _ in range(spec["warmup"]):
                runner[what]()
        conn.send(("ready", info))
    except Exception as e:  # reported by the parent as a skipped variant, with the reason
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   traceback.format_exc()))
        return
    while True:
        msg = conn.recv()
        if msg == "stop":
            return
        if msg == "memory":
            conn.send(_peak_memory(spec["framework"]))
            continue
        _, what = msg
        start = time.perf_counter()
        runner[what]()
        conn.send(time.perf_counter() - start)


def _build_jax(spec: dict):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from altjax import losses
    from altjax.models import layers, stack
    from altjax.training.objectives import Objective
    from altjax.training.step import init_state, make_train_step

    family, cfg, _ = configs(spec["model"])
    if spec.get("scan_layers"):
        cfg = scanned(cfg)
    dtype = jnp.bfloat16 if spec["precision"] == "bf16" else jnp.float32
    model = _jax_model_class(family)(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    if spec.get("depthwise"):
        from altjax.models.ops.depthwise_conv import DepthwiseConv

        for _, module in nnx.iter_modules(model):
            if isinstance(module, DepthwiseConv):
                module.impl = spec["depthwise"]
    batch = make_batch(cfg, spec["batch_size"], spec["seq_len"])
    device = jax.devices()[0]
    batch = {k: jax.device_put(v.astype(np.int32) if v.dtype == np.int64 else v, device) for k, v in batch.items()}
    info: dict[str, Any] = {"device": str(device.device_kind), "backend": jax.default_backend()}

    if spec["kind"] == "embed":
        model.eval()
        graphdef, state = nnx.split(model)
        image = jax.jit(lambda s, x: nnx.merge(graphdef, s).get_image_features(x))
        text = jax.jit(lambda s, ids, m, t: nnx.merge(graphdef, s).get_text_features(ids, m, t))
        start = time.perf_counter()
        image_c = image.lower(state, batch["pixel_values"]).compile()
        text_c = text.lower(state, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).compile()
        info["compile_s"] = time.perf_counter() - start
        info["flops"] = {"image": xla_flops(image_c), "text": xla_flops(text_c)}
        return {"image": lambda: image_c(state, batch["pixel_values"]).block_until_ready(),
                "text": lambda: text_c(state, batch["input_ids"], batch["attention_mask"],
                                       batch["token_type_ids"]).block_until_ready()}, info

    def features(m, b):
        return {"image_embeds": layers.l2_normalize(m.get_image_features(b["pixel_values"]).astype(jnp.float32)),
                "text_embeds": layers.l2_normalize(m.get_text_features(b["input_ids"], b["attention_mask"],
                                                                       b["token_type_ids"]).astype(jnp.float32))}

    def loss(m, feats, mesh):
        # The reference's losses: ALIGN's label-smoothed (0.1) softmax over logits / temperature,
        # CLIP's plain one over logits * exp(logit_scale).
        if family == "align":
            scale, smoothing = 1.0 / m.temperature[...], 0.1
        else:
            scale, smoothing = jnp.exp(m.logit_scale[...]), 0.0
        value = losses.contrastive_loss(feats["image_embeds"], feats["text_embeds"], kind="softmax",
                                        logit_scale=scale, label_smoothing=smoothing)
        return value, {}

    model.train()
    # As a training run sets it (altjax.training.loop.build_run): every transformer layer and MBConv
    # block rematerialised on its own.
    stack.set_remat(model, spec.get("remat"))
    # torch.optim.AdamW's defaults (betas, eps) and weight decay on every parameter, as the PyTorch side.
    tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    graphdef, state = init_state(model, nnx.Param, tx)
    del model
    step = make_train_step(graphdef, Objective(features, loss), tx, mesh=None)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    info["compile_s"] = time.perf_counter() - start
    info["flops"] = {"step": xla_flops(compiled)}
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        metrics["loss"].block_until_ready()

    return {"step": run}, info


def _build_torch(spec: dict):
    import contextlib

    import torch

    family, cfg, _ = configs(spec["model"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = _torch_model(family, cfg).to(device)
    batch = {k: torch.from_numpy(v).to(device) for k, v in make_batch(cfg, spec["batch_size"], spec["seq_len"]).items()}
    batch["pixel_values"] = batch["pixel_values"].permute(0, 3, 1, 2).contiguous()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    info: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}

    def autocast():
        if spec["precision"] == "bf16":
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    forward = torch.compile(model) if spec.get("compile") else model

    if spec["kind"] == "embed":
        model.eval()
        text_args = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        image_fn = torch.compile(model.get_image_features) if spec.get("compile") else model.get_image_features
        text_fn = torch.compile(model.get_text_features) if spec.get("compile") else model.get_text_features

        def image():
            with torch.no_grad(), autocast():
                image_fn(pixel_values=batch["pixel_values"])
            sync()

        def text():
            with torch.no_grad(), autocast():
                text_fn(**text_args)
            sync()

        if spec.get("count_flops"):
            info["flops"] = {**_torch_flops(image, "image"), **_torch_flops(text, "text")}
        if spec.get("compile"):
            info["compile_s"] = _first_call_seconds(image) + _first_call_seconds(text)
        return {"image": image, "text": text}, info

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, foreach=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = forward(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        sync()

    if spec.get("count_flops"):
        def forward_backward():
            with autocast():
                loss = model(**batch, return_loss=True).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        info["flops"] = _torch_flops(forward_backward, "step")
    if spec.get("compile"):
        info["compile_s"] = _first_call_seconds(step)
    return {"step": step}, info


def _first_call_seconds(fn) -> float:
    """Seconds of ``fn``'s first call: torch.compile compiles then, so this is its compile time
    (plus one call, a small part of it)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _torch_flops(fn, key: str) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return {key: float(counter.get_total_flops())}


# ----------------------------------------------------------------------------------------------
# Parent


def parse_variant(name: str) -> dict:
    """``jax-fp32``, ``jax-bf16-scan`` (``scan_layers`` on in every tower that has it),
    ``jax-bf16-remat`` (every layer rematerialised, policy nothing_saveable), ``jax-fp32-grouped``
    (EfficientNet's native grouped depthwise convolution instead of the CPU default), ``torch-fp32``
    (eager), ``torch-bf16`` (eager under autocast), ``torch-compile-fp32``, ... -> the worker spec's
    variant fields."""
    parts = name.split("-")
    framework, rest = parts[0], set(parts[1:])
    precision = "bf16" if "bf16" in rest else "fp32"
    known = {"fp32", "bf16"} | ({"scan", "remat", "grouped", "shifted"} if framework == "jax" else {"compile"})
    if (framework not in ("jax", "torch") or len(rest) != len(parts) - 1 or not rest <= known
            or len(rest & {"fp32", "bf16"}) != 1 or {"grouped", "shifted"} <= rest):
        raise ValueError(f"unknown variant {name!r}: jax-{{fp32,bf16}}[-scan][-remat][-grouped|-shifted] or "
                         f"torch[-compile]-{{fp32,bf16}}")
    spec = {"framework": framework, "precision": precision, "compile": "compile" in rest}
    if "scan" in rest:
        spec["scan_layers"] = True
    if "remat" in rest:
        spec["remat"] = "nothing_saveable"
    for impl in ("grouped", "shifted"):
        if impl in rest:
            spec["depthwise"] = impl
    return spec


def describe(name: str) -> str:
    """A readable label of a variant name."""
    spec = parse_variant(name)
    if spec["framework"] == "jax":
        extra = "".join([", scanned" if "scan_layers" in spec else "", ", remat" if "remat" in spec else "",
                         f", {spec['depthwise']} depthwise" if "depthwise" in spec else ""])
        return f"altjax {spec['precision']}{extra}"
    mode = "torch.compile" if spec["compile"] else "eager"
    return f"PyTorch {mode} {spec['precision'] if spec['precision'] == 'fp32' else 'autocast bf16'}"


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class Worker:
    """One variant's process."""

    def __init__(self, label: str, spec: dict):
        ctx = multiprocessing.get_context("spawn")
        self.label, self.spec = label, spec
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, spec), daemon=True)
        self.process.start()
        self.info: Optional[dict] = None
        self.error: Optional[str] = None
        self.times: dict[str, list[float]] = {}
        self.ready = False

    def wait_ready(self) -> bool:
        try:
            msg = self.conn.recv()
        except EOFError:
            self.error = f"worker died during setup (exit code {self.process.join(5) or self.process.exitcode})"
            return False
        if msg[0] == "error":
            self.error = msg[1]
            if os.environ.get("ALTJAX_BENCH_DEBUG"):
                print(msg[2], file=sys.stderr)
            self.process.join(30)
            return False
        self.info = msg[1]
        return True

    def _died(self) -> None:
        # Killed while running (on a small machine: by the kernel's OOM killer): reported, not fatal.
        self.process.join(5)
        self.error = f"worker died while running (exit code {self.process.exitcode}; out of memory?)"
        self.info, self.ready = None, False

    def run(self, what: str) -> None:
        try:
            self.conn.send(("run", what))
            self.times.setdefault(what, []).append(self.conn.recv())
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self._died()

    def finish(self) -> None:
        try:
            self.conn.send("memory")
            self.info["memory"] = self.conn.recv()
            self.conn.send("stop")
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self._died()
            return
        self.process.join(60)

    def median(self, what: str) -> float:
        return statistics.median(self.times[what])


def run_workers(variants: list[tuple[str, dict]], whats: tuple[str, ...], repeats: int, *,
                alternate: bool) -> list[Worker]:
    """Starts the variants' workers and times ``whats`` ``repeats`` times each: all alive and in
    turn when ``alternate``, else one worker after another."""
    def drive(group: list[Worker]):
        ready = [w for w in group if w.ready]
        for _ in range(repeats):
            for w in ready:
                for what in whats:
                    if w.ready:
                        w.run(what)
        for w in ready:
            if w.ready:
                w.finish()

    workers = []
    if alternate:
        # Set up one at a time (compile times and setup peaks are not inflated by each other).
        for label, spec in variants:
            w = Worker(label, spec)
            w.ready = w.wait_ready()
            workers.append(w)
        drive(workers)
    else:
        for label, spec in variants:
            w = Worker(label, spec)
            w.ready = w.wait_ready()
            drive([w])
            workers.append(w)
    return workers


def gflop(n: float) -> str:
    """FLOPs in GFLOP, three significant digits below 1000."""
    g = n / 1e9
    return f"{g:.3g} G" if g < 1000 else f"{g:.0f} G"


def write_json(path: str, header: dict, workers: list[Worker]) -> None:
    """The run's figures as JSON (for benchmarks/plot.py and the README table)."""
    import json

    rows = []
    for w in workers:
        row = {"variant": w.label, "label": describe(w.label), "error": w.error}
        if w.info is not None:
            row.update(medians={k: statistics.median(v) for k, v in w.times.items()}, times=w.times,
                       memory_kind=w.info["memory"][0], memory_bytes=w.info["memory"][1],
                       compile_s=w.info.get("compile_s"), flops=w.info.get("flops"))
        rows.append(row)
    with open(path, "w") as f:
        json.dump({**header, "command": " ".join(["python"] + sys.argv), "hardware": hardware(),
                   "versions": versions(), "rows": rows}, f, indent=1)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def versions() -> str:
    import flax
    import jax
    import torch
    import transformers

    return (f"jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {sys.version.split()[0]}")


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"
