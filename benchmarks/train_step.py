"""Train step time of the demo ALIGN (configs/demo.py) in altjax vs transformers' PyTorch AlignModel.

Usage: python benchmarks/train_step.py [--repeats 20] [--batch-size 64]

Both sides build the same model (the demo config written as an HF config for transformers), in
training mode (BatchNorm batch statistics; dropout as configured, 0 in the demo), on the same
random batch (32 px images, 24-token captions), and time one full optimiser step: forward, ALIGN
loss, backward, AdamW update (torch.optim.AdamW(foreach) vs optax.adamw; both with the same
learning rate and weight decay, no clipping). The altjax step is the trainer's jitted function
(``altjax.train_step.make_train_step``, state donated) on one device; the LAMB step the demo
trains with is timed too. Each figure is the median over ``--repeats`` steps after three warm-up
steps; ratio = PyTorch time / altjax time (above 1: altjax is faster). Both run in this process
on all the cores (torch.set_num_threads(os.cpu_count()); XLA's CPU backend uses every core).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from altjax import optim, sharding
    from altjax.models.align import AlignModel
    from altjax.train import CONFIGS_DIR, load_config, model_config
    from altjax.train_step import align_objective, init_state, make_train_step

    torch.set_num_threads(os.cpu_count())
    config = load_config(os.path.join(CONFIGS_DIR, "demo.py"))
    vocab_size = 100
    align_config = model_config(config, vocab_size)
    b, length, size = args.batch_size, int(config.data.max_length), int(config.model.vision.image_size)
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, length + 1, (b, 1))
    mask = (np.arange(length)[None] < lengths).astype(np.int64)
    batch = {"pixel_values": rng.uniform(-1, 1, (b, size, size, 3)).astype(np.float32),
             "input_ids": rng.integers(5, vocab_size, (b, length)) * mask,
             "attention_mask": mask, "token_type_ids": np.zeros((b, length), np.int64)}

    def median_time(step, repeats):
        for _ in range(3):
            step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    # ----- altjax -----
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    jax_batch = sharding.shard_batch({k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in batch.items()},
                                     mesh)
    results = {}
    for name in ("adamw", "lamb"):
        model = AlignModel(align_config, rngs=nnx.Rngs(0))
        model.train()
        opt = config.optimizer.copy_and_resolve_references()
        opt.name, opt.warmup_steps, opt.decay, opt.grad_clip_norm = name, 0, "constant", 0.0
        trainable = optim.trainable_filter("")
        tx = optim.build(opt, 1000, nnx.state(model, trainable))
        graphdef, state = init_state(model, trainable, tx)
        step_fn = make_train_step(graphdef, align_objective(), tx, mesh=mesh)
        holder = {"state": state}

        def jax_step():
            holder["state"], metrics = step_fn(holder["state"], jax_batch)
            jax.block_until_ready(metrics["loss"])

        results[name] = median_time(jax_step, args.repeats)

    # ----- PyTorch -----
    torch.manual_seed(0)
    hf_config = transformers.AlignConfig.from_dict(align_config.to_hf())
    torch_model = transformers.AlignModel(hf_config).train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=float(config.optimizer.learning_rate),
                                  weight_decay=float(config.optimizer.weight_decay), foreach=True)
    torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    torch_batch["pixel_values"] = torch_batch["pixel_values"].permute(0, 3, 1, 2).contiguous()

    def torch_step():
        optimizer.zero_grad(set_to_none=True)
        loss = torch_model(**torch_batch, return_loss=True).loss
        loss.backward()
        optimizer.step()

    torch_time = median_time(torch_step, args.repeats)

    params = sum(int(np.prod(p.shape)) for p in torch_model.parameters())
    print(f"demo ALIGN ({params / 1e6:.2f}M parameters), batch {b}, {size} px images, {length} tokens, "
          f"{os.cpu_count()} cores, median of {args.repeats} steps")
    print(f"{'step':<28}{'altjax':>10}{'PyTorch':>10}{'ratio':>8}")
    print(f"{'AdamW (both)':<28}{results['adamw'] * 1e3:>8.1f}ms{torch_time * 1e3:>8.1f}ms"
          f"{torch_time / results['adamw']:>8.2f}")
    print(f"{'LAMB (altjax, as trained)':<28}{results['lamb'] * 1e3:>8.1f}ms{'':>10}{'':>8}")
    print(f"altjax throughput (AdamW): {b / results['adamw']:.0f} pairs/s; PyTorch: {b / torch_time:.0f} pairs/s")


if __name__ == "__main__":
    main()
