#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one call of about 6 to 10 minutes:
#
#   bash benchmarks/gpu.sh [OUT]          # OUT defaults to benchmarks/gpu-<UTC date and time>
#
# It writes JSON (and each command's log) under OUT:
#   train-seq1024-bf16.json   training at 1024-token rows, bf16, no dropout: tokens/s, MFU against a matrix-multiply
#                             peak measured in the same run, the attention kernel that ran (cuDNN's fused one is
#                             expected), against PyTorch on the same GPU when PyTorch sees it
#   memory-gpt2-xl.json       gpt2-xl, one 1024-token row, bf16, --remat: device peak memory measured against XLA's
#                             plan, for full fine-tuning, LoRA r=16 and QLoRA (nf4 base)
#   decode.json               batch-1 greedy decoding: time to first token and per token, against PyTorch generate
#   answers-batched.json      64 held-out answers batched against one by one
#   trl-help-desk-bf16.json   where TRL is installed: jaxtune bf16 against TRL's SFTTrainer (packing, grouped)
#   tests.log                 the model's and generation's tests, run on the GPU
# It stops at once, with exit code 2 and a message, when JAX sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=$(command -v python || command -v python3)  # images with CUDA often have only python3
backend=$(timeout 120 "$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -n 1)
if [ "$backend" != "gpu" ]; then
  echo "benchmarks/gpu.sh: JAX sees no GPU here (its backend is '${backend:-unknown}'). Run it on a machine with an" \
       "NVIDIA GPU and JAX's CUDA build: pip install -U 'jax[cuda12]' -r requirements.txt" >&2
  exit 2
fi
OUT="${1:-benchmarks/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>/dev/null || true
"$PY" -c "import sys, jax, jaxlib, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib',
jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee "$OUT/versions.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>/dev/null | tee -a "$OUT/versions.txt"
torch=$(timeout 60 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null | tail -n 1)
[ "$torch" = "1" ] && baseline=() || baseline=(--no-torch)  # a CPU-only PyTorch would compare nothing
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, go on if it fails
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    echo "   $name failed or ran past ${limit}s; see $OUT/$name.log"
    failed=1
  fi
  tail -n 4 "$OUT/$name.log"
}

step train-seq1024-bf16 120 "$PY" -m jaxtune.bench --seq 1024 --batch 8 --dtype bfloat16 --torch-dtype bfloat16 \
  --no-dropout --seconds 10 "${baseline[@]}" --json "$OUT/train-seq1024-bf16.json"
step decode 50 "$PY" -m jaxtune.bench --decode --new-tokens 64 --json "$OUT/decode.json"
step answers-batched 50 "$PY" -m jaxtune.evaluate --bench --preset gpt2 --n 64 --max-new-tokens 64 --repeat 2 \
  --json "$OUT/answers-batched.json"
# last, as the longest: three processes that each compile a 48-block step; each side's line is logged as it ends
step memory-gpt2-xl 270 "$PY" -m jaxtune.bench --model gpt2-xl --seq 1024 --batch 1 --dtype bfloat16 --no-dropout \
  --remat --lora-rank 16 --quantize nf4 --no-torch --seconds 3 --json "$OUT/memory-gpt2-xl.json"
if "$PY" -c "import trl, datasets" 2>/dev/null; then  # TRL's SFTTrainer on the GPU, where it is installed
  step trl-help-desk-bf16 150 "$PY" -m jaxtune.bench --dtype bfloat16 --baseline trl --trl-modes packing grouped \
    --seconds 8 --json "$OUT/trl-help-desk-bf16.json"
else
  echo "== trl-help-desk-bf16: skipped (TRL or datasets is not installed; benchmarks/gpu-wheels.sh fetches them)"
fi
# the tests that differ on a GPU: the model against PyTorch, cuDNN's attention, training, generation
step tests 120 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_model.py tests/test_generate.py
echo "figures in $OUT"
exit $failed
