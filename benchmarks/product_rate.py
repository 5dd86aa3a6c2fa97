"""Where a CPU training step's time goes, and the rate its matrix products run at against the kernel's peak.

    python benchmarks/product_rate.py [--model gpt2] [--dtype bfloat16] [--steps 6] [--json out.json]

Linux `perf` samples the process while it trains (jaxtune's Trainer, packed rows as `python -m jaxtune.bench`
trains). Each sample is put in one group by the function it fell in: matrix-product kernels (XLA's YNNPACK/XNNPACK
dot, Eigen's contraction, oneDNN), XLA's compiled fusions ([JIT] code: element-wise work, reductions, random bits),
the kernel (page faults, scheduling), memory copies, and the rest. The products' CPU time is their share of the
process's CPU time (user + system, from the OS); their FLOPs are counted from the shapes (every position's block
products, the head at the positions whose next token is a target, XLA's full S x S attention scores and mixing in
each row; backward = 2 x forward). Their rate is set against the same dtype's matrix-multiply peak measured in this
process (`jaxtune.bench.measure_matmul_peak`, all cores), per core. Needs `perf` (Debian: `apt-get install
linux-perf`) and permission to sample the process (root, or kernel.perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone: the jaxtune beside it

GROUPS = (  # the first pattern a symbol matches names its group
    ("matrix products", re.compile(r"ynn::dot_|xnn_.*gemm|gebp|gemm_pack|TensorContraction|dnnl|onednn|brgemm|mkl")),
    ("memory copies", re.compile(r"memmove|memcpy|memset")),
)


def _group(dso: str, symbol: str) -> str:
    for name, pattern in GROUPS:
        if pattern.search(symbol):
            return name
    if dso.startswith("[JIT]"):
        return "XLA fusions (compiled code)"
    if dso == "[kernel.kallsyms]":
        return "kernel (page faults, scheduling)"
    return "other"


def perf_groups(data: str) -> dict[str, float]:
    """Sample shares (percent) by group from a perf.data file."""
    report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio",
                             "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+(?: tid \d+)?)\s+\[[.k]\]\s+(.*)", line)
        if m:
            shares[_group(m[2], m[3])] = shares.get(_group(m[2], m[3]), 0.0) + float(m[1])
    return shares


def product_flops(config, batch: dict) -> float:
    """FLOPs of one training step's matrix products (forward x 3), from the batch's shapes."""
    B, S = batch["input_ids"].shape[-2:]
    rows = batch["input_ids"].size // S
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    logits = batch["logit_positions"].size if "logit_positions" in batch else rows * S
    forward = 2 * rows * S * 12 * L * d * d + 2 * logits * V * d + 4 * L * rows * S * S * d
    return 3.0 * forward


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=6, help="steps sampled, after two unsampled ones")
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if not shutil.which("perf"):
        print("error: needs Linux perf (Debian: apt-get install linux-perf)", file=sys.stderr)
        raise SystemExit(2)

    import numpy as np

    from jaxtune.bench import PRESETS, measure_matmul_peak
    from jaxtune.checkpoint import offline_tokenizer
    from jaxtune.config import TrainConfig
    from jaxtune.data import read_pairs
    from jaxtune.model import build

    from jaxtune.train import Trainer

    peak = measure_matmul_peak(args.dtype)
    config = PRESETS[args.model]
    cfg = TrainConfig(batch_size=4, max_length=256, pack=True, epochs=100, warmup_steps=0, buckets=(256,),
                      dtype=args.dtype, dropout=not args.no_dropout)
    pairs = read_pairs(Path(__file__).resolve().parent.parent / "examples" / "customer_service.jsonl")
    trainer = Trainer(build(config, seed=0), offline_tokenizer(), pairs, cfg)
    flops = [product_flops(config, batch) for _, batch in
             (next(trainer._batches(i)) for i in range(2, 2 + args.steps))]
    state: dict = {}

    def on_step(s):
        if s.step == 2:  # compiled and warm: sample from here
            state["perf"] = subprocess.Popen(["perf", "record", "-F", "499", "-p", str(os.getpid()), "-o",
                                              state["data"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # perf attaches
            state["t0"], state["r0"] = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        if s.step == 2 + args.steps:
            state["t1"], state["r1"] = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            state["perf"].send_signal(signal.SIGINT)
            state["perf"].wait()

    with tempfile.TemporaryDirectory() as tmp:
        state["data"] = f"{tmp}/perf.data"
        trainer.run(on_step=on_step, should_stop=lambda: "t1" in state)
        shares = perf_groups(state["data"])
    wall = state["t1"] - state["t0"]
    cpu = sum(getattr(state["r1"], f) - getattr(state["r0"], f) for f in ("ru_utime", "ru_stime"))
    cores = os.cpu_count()
    # the steps reported from t0 to t1 (each report follows the next step's dispatch): args.steps of them
    product_cpu = shares.get("matrix products", 0.0) / 100 * cpu
    rate_per_core = float(np.sum(flops)) / product_cpu if product_cpu else 0.0
    out = {"model": args.model, "dtype": args.dtype, "dropout": not args.no_dropout, "steps": args.steps,
           "step_s": wall / args.steps, "cpu_s_per_step": cpu / args.steps, "cores": cores,
           "shares_percent": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
           "product_gflop_per_step": float(np.mean(flops)) / 1e9, "matmul_peak_gflops": peak / 1e9,
           "product_rate_of_peak": rate_per_core / (peak / cores)}
    print(f"{args.model}, {args.dtype}, dropout {'on' if out['dropout'] else 'off'}: {out['step_s']:.2f} s a step, "
          f"{out['cpu_s_per_step']:.2f} CPU s a step on {cores} cores")
    for name, share in out["shares_percent"].items():
        print(f"  {share:5.1f}%  {name}")
    print(f"matrix products: {out['product_gflop_per_step']:.0f} GFLOP a step at {100 * out['product_rate_of_peak']:.0f}% "
          f"of the {out['matmul_peak_gflops']:.0f} GFLOP/s {args.dtype} matrix-multiply peak measured here")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
