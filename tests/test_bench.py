"""The benchmark, end to end on a tiny model: both sides train on the example data and every figure is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "jaxtune.bench", "--model", "tiny", *args, "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


def test_bench_compares_both_sides_on_the_same_data(tmp_path):
    stdout, r = bench(tmp_path, "--batch", "2", "--max-length", "128", "--seconds", "2")
    j, t = r["jax"], r["torch"]
    assert j["compiled_programs"] == 1 and j["shapes_after_first_epoch_not_in_first"] == 0
    assert j["real_token_share"] > 0.9 > t["real_token_share"]  # packed rows against padding to the longest
    assert j["steps_timed"] >= 2 and t["steps_timed"] >= 2
    assert r["speedup_useful_tokens"] == j["useful_tokens_per_s"] / t["useful_tokens_per_s"]
    assert 0 < j["mfu"] < 1 and 0 < t["mfu"] < 1 and j["compile_s"] > 0 and j["planned_memory_gib"] > 0
    best = max(j["matmul_peak_flops"], t["matmul_peak_flops"])  # one dtype: both against the faster framework's
    assert t["mfu"] == pytest.approx(t["useful_tokens_per_s"] * r["model_flops_per_token"] / best)
    assert j["attention"] == "xla" and t["batch"].startswith(f"{r['config']['torch_batch']} examples, padded")
    assert "jaxtune / pytorch useful tokens/s" in stdout and "MFU" in stdout


def test_bench_plans_memory_without_training(tmp_path):
    stdout, r = bench(tmp_path, "--plan-memory", "--seq", "128", "--batch", "2", "--no-dropout")
    plan = r["plan_gib"]
    assert plan["peak"] == pytest.approx(plan["arguments"] + plan["outputs"] + plan["temporaries"] - plan["aliased"])
    assert "XLA plans" in stdout and "GiB per device" in stdout and "dropout off" in stdout


def test_bench_decoding_latency_against_pytorch(tmp_path):
    stdout, r = bench(tmp_path, "--decode", "--new-tokens", "8")
    j, t = r["jax"], r["torch"]
    assert t["tokens"] == 8 and 1 <= j["tokens"] <= 8
    assert all(x["time_to_first_token_ms"] > 0 and x["ms_per_token"] > 0 for x in (j, t))
    assert r["speedup_per_token"] == pytest.approx(t["ms_per_token"] / j["ms_per_token"])
    assert "ms/token" in stdout and "per token" in stdout
