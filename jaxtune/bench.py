"""Train-step throughput: jaxtune's jitted step beside a PyTorch transformers step, same model shape, same batch.

    python -m jaxtune.bench                         # GPT-2 124M shape, batch 8 x 64, on this machine's devices
    python -m jaxtune.bench --batch 8 --seq 1024 --dtype bfloat16 --json out.json   # e.g. on a GPU

Both sides do forward, backward and an AdamW update with dropout on; the figures are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.config import PRESETS, TrainConfig
from jaxtune.model import build, num_params
from jaxtune.train import make_optimizer, make_train_step
from flax import nnx


def bench_jax(config, ids: np.ndarray, steps: int, dtype: str) -> dict:
    model = build(config, seed=0)
    graphdef, params = nnx.split(model)
    cfg = TrainConfig(dtype=dtype, warmup_steps=0)
    optimizer = make_optimizer(cfg, 1000)
    opt_state = optimizer.init(params)
    step = make_train_step(graphdef, optimizer, cfg)
    batch = {"input_ids": ids[None], "loss_mask": np.ones_like(ids)[None], "attention_mask": np.ones_like(ids)[None]}
    batch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    params, opt_state, m = compiled(params, opt_state, batch, key)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt_state, m = compiled(params, opt_state, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
    out = {"step_s": step_s, "tokens_per_s": ids.size / step_s, "compile_s": compile_s, "loss": float(m["loss"]),
           "params": num_params(model)}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    return out


def bench_torch(config, ids: np.ndarray, steps: int) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2Config(**{k: v for k, v in config.to_hf().items() if k not in ("architectures",)})
    model = transformers.GPT2LMHeadModel(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    x = torch.tensor(ids, dtype=torch.long)

    def one():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    one()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one()
    step_s = (time.perf_counter() - t0) / steps
    return {"step_s": step_s, "tokens_per_s": ids.size / step_s, "loss": loss.item(), "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=sorted(PRESETS), help="architecture preset (random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    config = PRESETS[args.model]
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    print(f"{args.model} shape, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps, "
          f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)), {platform.processor() or platform.machine()}")
    results = {"config": vars(args), "jax": bench_jax(config, ids, args.steps, args.dtype)}
    j = results["jax"]
    print(f"jaxtune  : {j['tokens_per_s']:9.1f} tokens/s  {j['step_s'] * 1000:8.1f} ms/step  compile {j['compile_s']:.1f}s"
          + (f"  peak {j['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in j else ""))
    if not args.no_torch:
        results["torch"] = t = bench_torch(config, ids, args.steps)
        print(f"pytorch  : {t['tokens_per_s']:9.1f} tokens/s  {t['step_s'] * 1000:8.1f} ms/step  ({t['threads']} threads)")
        results["speedup"] = j["tokens_per_s"] / t["tokens_per_s"]
        print(f"jaxtune / pytorch tokens/s: {results['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
