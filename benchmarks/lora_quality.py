"""Which projections LoRA should adapt by default, and what QLoRA's quantized base costs in quality.

A base is made first: the embedded model fully fine-tuned for a few epochs on the help-desk pairs (a random base
would measure nothing: quantizing noise costs nothing). Every variant then starts from a copy of that base and
trains the same steps on the same batches; the table gives its validation loss on the held-out pairs before
(the quantized base alone) and after, its trainable parameters and its seconds.

    python benchmarks/lora_quality.py [--base-epochs 3] [--epochs 6] [--json benchmarks/lora-quality.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone: the jaxtune beside it

import jax

from flax import nnx

from jaxtune import TrainConfig, Trainer, load, read_pairs

VARIANTS = [  # (name, lora_targets, quantize)
    ("LoRA c_attn", ("c_attn",), "none"),
    ("LoRA c_attn, c_proj", ("c_attn", "c_proj"), "none"),
    ("LoRA c_attn, c_proj, c_fc", ("c_attn", "c_proj", "c_fc"), "none"),
    ("QLoRA int8 c_attn, c_proj, c_fc", ("c_attn", "c_proj", "c_fc"), "int8"),
    ("QLoRA nf4 c_attn, c_proj, c_fc", ("c_attn", "c_proj", "c_fc"), "nf4"),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--data", default="examples/customer_service.jsonl")
    p.add_argument("--validation", default="examples/customer_service_val.jsonl")
    p.add_argument("--base-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=5e-3)
    p.add_argument("--json")
    args = p.parse_args()
    pairs, val = read_pairs(args.data), read_pairs(args.validation)
    common = dict(batch_size=8, max_length=96, warmup_steps=20, seed=0)
    base, tok = load(args.model)
    result = Trainer(base, tok, pairs, TrainConfig(epochs=args.base_epochs, learning_rate=args.learning_rate, **common),
                     validation_pairs=val).run()
    base_val = Trainer(nnx.clone(base), tok, pairs[:8], TrainConfig(**common), validation_pairs=val).validation_loss()
    print(f"base: {args.model} fully fine-tuned {args.base_epochs} epochs ({result.history[-1].step} steps), "
          f"validation loss {base_val:.4f}")
    rows = []
    for name, targets, quantize in VARIANTS:
        cfg = TrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, lora_rank=args.rank,
                          lora_targets=targets, quantize=quantize, **common)
        trainer = Trainer(nnx.clone(base), tok, pairs, cfg, validation_pairs=val)
        start = time.perf_counter()
        out = trainer.run(eval_every=10**9)
        rows.append({"variant": name, "targets": list(targets), "quantize": quantize,
                     "trainable": sum(x.size for x in jax.tree.leaves(trainer.params)),
                     "val_before": out.initial_val_loss, "val_after": trainer.validation_loss(),
                     "steps": trainer.step, "seconds": time.perf_counter() - start})
        r = rows[-1]
        print(f"{name:34s} trainable {r['trainable']:>8,}  val {r['val_before']:.4f} -> {r['val_after']:.4f}  "
              f"{r['steps']} steps in {r['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "base_val_loss": base_val, "variants": rows}, f, indent=2)


if __name__ == "__main__":
    main()
