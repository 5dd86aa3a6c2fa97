"""Two processes on JAX's multi-host runtime (2 simulated CPU devices each) train like one process on one device.

Each `python -m jaxtune train` process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, as a
launcher on a pod or cluster would set them; they meet over loopback and run one sharded step across 4 devices.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, output, hosts: int, devices_per_host: int):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_host}")
    if hosts > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(hosts))
    procs = [subprocess.Popen([sys.executable, "-m", "jaxtune", "train", *args, "--output", str(output)],
                              env=dict(env, JAX_PROCESS_ID=str(i)) if hosts > 1 else env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(hosts)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    lines = (ROOT / "examples" / "customer_service.jsonl").read_text().splitlines()[:32]
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(data, mode=None):
    return ["--model", "tiny", "--data", str(data), "--epochs", "2", "--batch-size", "8", "--max-length", "128",
            "--learning-rate", "1e-3", "--samples", "1", "--pack", "--distributed", "auto", "--save-every", "2"] + \
        (["--fsdp"] if mode == "fsdp" else [])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, data):
    """The reference: one process on one device, no sharding (both modes are held to it)."""
    folder = tmp_path_factory.mktemp("one") / "run"
    train(_args(data), folder, hosts=1, devices_per_host=1)
    return folder


@pytest.mark.parametrize("mode", ["data", "fsdp"])
def test_two_hosts_train_like_one_device(tmp_path, data, one_device, mode):
    """Same losses and same final weights; process 0 alone writes the model; orbax checkpoints from both hosts."""
    (tmp_path / "one").symlink_to(one_device)
    outs = train(_args(data, mode), tmp_path / "two", hosts=2, devices_per_host=2)
    assert "process 1 of 2: 2 of 4 devices" in outs[1][1]
    assert "model written to" in outs[0][0] and "model written to" not in outs[1][0]  # process 0 writes
    assert [p.name for p in sorted((tmp_path / "two" / "checkpoints").iterdir()) if p.name.isdigit()]  # both hosts saved

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) >= 4
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    w_one, w_two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert set(w_one) == set(w_two)
    for name in w_one:
        assert np.abs(w_one[name] - w_two[name]).max() < 1e-4, name
