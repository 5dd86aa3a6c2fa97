"""Shared fixtures: the offline tokenizer and tiny random GPT-2 models saved by PyTorch transformers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the command lines and apps the tests start share one compilation cache, kept out of the user's own
os.environ.setdefault("JAXTUNE_COMPILATION_CACHE", __import__("tempfile").mkdtemp(prefix="jaxtune-test-xla-"))

import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxtune.checkpoint import offline_tokenizer

if jax.default_backend() == "gpu":
    # XLA multiplies float32 matrices in TF32 on NVIDIA GPUs by default: on an H200 the logits of the tiny models
    # here came 3e-4 from PyTorch's float32 ones. The comparisons with PyTorch test the math, in full float32.
    jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4)


@pytest.fixture(scope="session")
def tokenizer():
    return offline_tokenizer()


def make_hf_model(directory, seed=0, **overrides):
    """A tiny random GPT2LMHeadModel saved by transformers, with the offline tokenizer beside it."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**TINY, **overrides})
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms trivial; perturb them so parity means something
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    offline_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    make_hf_model(directory)
    return directory


@pytest.fixture(scope="session")
def torch_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def torch_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(np.asarray(attention_mask))}
        return model(torch.tensor(np.asarray(ids)), **kwargs).logits.numpy()


def start_app(log: Path, drop=(), **env) -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free loopback port, offline, with `env` added to the environment (and the variables in
    `drop` taken out) and its output in `log`; returns (process, url) once it listens. Fails the test, with the log's
    end, if it exits or has not started within 180 s."""
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(root), **env)
    for name in drop:
        env.pop(name, None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline:
                proc.kill()
                pytest.fail(f"app.py did not start: {log.read_text()[-2000:]}")
            time.sleep(1)
