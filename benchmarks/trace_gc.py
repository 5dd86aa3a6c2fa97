"""What pausing Python's garbage collector saves while a new train step is traced, lowered and loaded.

The trainer pauses the collector while jit traces a program it has not run yet (`jaxtune.train._gc_paused`). This
script measures that choice the way a second launch meets it: each round is a fresh process with the compilation
cache already filled, which traces and lowers the GPT-2 124M step (`Trainer.lower_step`) and loads its program,
with the collector on or paused; the two kinds alternate, so a slower moment of the machine hits both.

    python benchmarks/trace_gc.py [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(cache: str, paused: bool) -> dict:
    """In this (fresh) process: the 124M step traced and lowered, then compiled or loaded from `cache`."""
    from jaxtune.bench import PRESETS
    from jaxtune.checkpoint import offline_tokenizer
    from jaxtune.config import TrainConfig
    from jaxtune.data import read_pairs
    from jaxtune.model import build
    from jaxtune.sharding import enable_compilation_cache
    from jaxtune.train import Trainer, _gc_paused

    enable_compilation_cache(cache)
    cfg = TrainConfig(batch_size=4, max_length=256, pack=True, epochs=100, warmup_steps=0, buckets=(256,))
    trainer = Trainer(build(PRESETS["gpt2"], seed=0), offline_tokenizer(), read_pairs(ROOT / "examples" /
                                                                                      "customer_service.jsonl"), cfg)
    with _gc_paused(paused):
        start = time.perf_counter()
        lowered = trainer.lower_step()
        traced = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
    return {"trace_lower_s": traced - start, "load_s": done - traced, "ready_s": done - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="fresh processes of each kind")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--one", choices=("on", "paused"), help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.cache, args.one == "paused")))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    runs = {"on": [], "paused": []}
    with tempfile.TemporaryDirectory(prefix="jaxtune-trace-gc-") as cache:
        def run(kind):
            out = subprocess.run([sys.executable, __file__, "--one", kind, "--cache", cache], env=env, check=True,
                                 capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        run("on")  # fills the cache: every later process loads the program
        for _ in range(args.rounds):
            for kind in ("on", "paused"):
                runs[kind].append(run(kind))
    summary = {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}
    for kind in ("on", "paused"):
        s = summary[kind]
        print(f"collector {kind:6}: traced and lowered in {s['trace_lower_s']:.2f} s, loaded in {s['load_s']:.2f} s, "
              f"ready after {s['ready_s']:.2f} s (median of {args.rounds})")
    print(f"pausing it: {summary['on']['ready_s'] - summary['paused']['ready_s']:+.2f} s less until the step is ready")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
