"""XLA's per-device memory plan of one training step for full fine-tuning, LoRA and QLoRA, each with and without
--remat: one `python -m jaxtune.bench --plan-memory` process per row, gathered into one JSON file and a table.

    python benchmarks/plan_adapters.py --model gpt2-xl --seq 1024 --batch 1 --json benchmarks/plan-gpt2-xl-adapters.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-xl")
    p.add_argument("--seq", default="1024")
    p.add_argument("--batch", default="1")
    p.add_argument("--lora-rank", default="16")
    p.add_argument("--quantize", default="nf4")
    p.add_argument("--no-dropout", action="store_true", help="plan without dropout")
    p.add_argument("--json", help="also write the plans to this file")
    args = p.parse_args()
    common = ["--plan-memory", "--model", args.model, "--seq", args.seq, "--batch", args.batch, "--dtype", "bfloat16",
              *(["--no-dropout"] if args.no_dropout else [])]
    methods = {"full": [], "lora": ["--lora-rank", args.lora_rank],
               f"qlora-{args.quantize}": ["--lora-rank", args.lora_rank, "--quantize", args.quantize]}
    rows = []
    for method, extra in methods.items():
        for remat in (False, True):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, "-m", "jaxtune.bench", *common, *extra, *(["--remat"] if remat else []),
                       "--json", f.name]
                subprocess.run(cmd, check=True, cwd=ROOT)
                rows.append({"method": method, "remat": remat, **json.loads(Path(f.name).read_text())})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| method | remat | planned per device | arguments (weights, optimizer state, batch) | temporaries |")
    print("|---|---|---|---|---|")
    for r in rows:
        g = r["plan_gib"]
        print(f"| {r['method']} | {'yes' if r['remat'] else 'no'} | {g['peak']:.1f} GiB | {g['arguments']:.2f} GiB | "
              f"{g['temporaries']:.1f} GiB |")


if __name__ == "__main__":
    main()
