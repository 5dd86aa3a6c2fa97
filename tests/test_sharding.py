"""The sharded train step on 8 simulated CPU devices gives the 1-device step's losses and parameters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune.sharding import array_sharding, make_mesh

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_steps.py")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_data_parallel_matches_one_device(sharded):
    assert len(sharded["one"]) == 2  # 16 pairs, batch 8, two micro-batches per step, two epochs
    assert max(abs(a - b) for a, b in zip(sharded["one"], sharded["data"])) < 1e-5
    assert sharded["data_max_diff"] < 1e-5
    assert sharded["data_devices"] == 8 and "fsdp" not in sharded["data_spec"]  # replicated on all 8


def test_fsdp_matches_one_device_and_shards_parameters(sharded):
    assert max(abs(a - b) for a, b in zip(sharded["one"], sharded["fsdp"])) < 1e-5
    assert sharded["fsdp_max_diff"] < 1e-5
    assert "fsdp" in sharded["fsdp_spec"] and sharded["fsdp_devices"] == 8  # each device holds 1/8 of the kernel


def test_lora_data_parallel_and_fsdp_match_one_device(sharded):
    """LoRA with gradient accumulation on 8 devices: the same losses and adapters as on one; under fsdp the frozen
    base is split over the devices like any parameter."""
    assert len(sharded["lora_one"]) == 2
    for side in ("lora_data", "lora_fsdp"):
        assert max(abs(a - b) for a, b in zip(sharded["lora_one"], sharded[side])) < 1e-5
        assert sharded[f"{side}_max_diff"] < 1e-5
    assert "fsdp" in sharded["lora_base_spec"]


def test_qlora_data_parallel_and_fsdp_match_one_device(sharded):
    """QLoRA (nf4 base) on 8 devices: the same losses and adapters as on one; under fsdp the codes are split."""
    for side in ("qlora_data", "qlora_fsdp"):
        assert max(abs(a - b) for a, b in zip(sharded["qlora_one"], sharded[side])) < 1e-5
        assert sharded[f"{side}_max_diff"] < 1e-5
    assert "fsdp" in sharded["qlora_codes_spec"]


def test_each_run_compiles_its_train_step_once(sharded):
    """One program per run, one device or eight: the first step's `go` flag once came from the host and the later
    ones from the previous step on the mesh, so every multi-device run compiled its step twice."""
    assert sharded["step_programs"] == [1] * 9


def test_fsdp_spreads_the_training_state_over_the_devices(sharded):
    """XLA's memory plan per device: with fsdp, each of the 8 devices holds an eighth of the parameters, the
    AdamW moments and the batch; replicated, each holds all of them."""
    rep, fsdp = sharded["plan_replicated"], sharded["plan_fsdp"]
    assert rep["arguments"] / 8 <= fsdp["arguments"] < rep["arguments"] / 8 + 1024


def test_fsdp_keeps_activations_and_dropout_masks_split_by_rows(sharded):
    """With fsdp, each device's activations (dropout on) take about what they take with data parallelism. Left to
    itself XLA split them by width next to the fsdp-split weights and made every device compute the whole batch's
    dropout masks: 837 MiB of temporaries against 188 MiB here."""
    rep, fsdp = sharded["plan_wider_replicated"], sharded["plan_wider_fsdp"]
    assert fsdp["temporaries"] < 1.2 * rep["temporaries"]


def test_fsdp_shards_the_largest_divisible_dimension():
    import jax

    mesh = make_mesh(fsdp=True, devices=jax.devices()[:1])
    assert array_sharding(mesh, (768, 3072)).spec == jax.sharding.PartitionSpec()  # one device: nothing to split
