"""The benchmark, end to end on a tiny model: both sides train on the example data and every figure is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# XLA and PyTorch sum the same float32 losses in different orders: measured equal to 2e-6 on the tiny model (a loss
# of ~10.86); 1e-4 is 50x that, and far below what a different batch, weight or mask would change (~1e-2)
SAME_LOSS = 1e-4


def bench(tmp_path, *args, env=None):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "jaxtune.bench", "--model", "tiny", *args, "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


@pytest.fixture
def four_pairs(tmp_path):
    """Four help-desk pairs (149 tokens): one jaxtune step (a row of 256) and one PyTorch batch hold them all, so
    every side's first loss is the loss of the same examples on the same weights."""
    path = tmp_path / "four.jsonl"
    path.write_text("".join((ROOT / "examples/customer_service.jsonl").read_text().splitlines(True)[:4]))
    return ["--data", str(path), "--batch", "1", "--torch-batch", "4", "--max-length", "256", "--no-dropout"]


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


def test_bench_lora_against_full_and_peft_on_the_same_weights(tmp_path, four_pairs):
    stdout, r = bench(tmp_path, *four_pairs, "--seconds", "1", "--lora-rank", "4", "--lora-targets", "c_attn", "c_proj",
                      "--quantize", "nf4")
    full, lora, qlora, peft = r["jax"], r["jax_lora"], r["jax_qlora"], r["peft"]
    # adapters on c_attn and both c_proj of 2 blocks: (128 + 384) x 4 + 2 x (128 + 128) x 4 + (512 + 128) x 4 each
    assert lora["trained_parameters"] == peft["trained_parameters"] == 2 * 4 * (128 + 384 + 128 + 128 + 512 + 128)
    assert full["trained_parameters"] > 500 * lora["trained_parameters"]
    assert lora["optimizer_state_gib"] < full["optimizer_state_gib"] / 500
    assert "uint8" in qlora["frozen_base_dtypes"] and qlora["frozen_base_gib"] < lora["frozen_base_gib"]
    # the adapters start at zero (B = 0): full, LoRA and PEFT LoRA take their first step from the same model and loss
    first = full["loss_first_last"][0]
    assert lora["loss_first_last"][0] == pytest.approx(first, abs=SAME_LOSS)
    assert peft["loss_first_last"][0] == pytest.approx(first, abs=SAME_LOSS)
    assert qlora["loss_first_last"][0] == pytest.approx(first, abs=0.05)  # NF4 rounds the base's projections
    assert qlora["loss_first_last"][0] != pytest.approx(first, abs=1e-6)
    assert r["lora_vs_full"]["useful_tokens"] == lora["useful_tokens_per_s"] / full["useful_tokens_per_s"]
    assert r["lora_vs_full"]["peak_rss"] == lora["process_peak_rss_gib"] / full["process_peak_rss_gib"]
    assert r["jax_lora_vs_peft"]["useful_tokens"] == lora["useful_tokens_per_s"] / peft["useful_tokens_per_s"]
    assert "mfu" in full and "mfu" not in lora  # 6 x parameters FLOPs per token is full fine-tuning's count
    for line in ("jaxtune full", "jaxtune LoRA r=4", "jaxtune QLoRA nf4", "PEFT LoRA r=4", "jaxtune LoRA / full",
                 "jaxtune LoRA / PEFT LoRA"):
        assert line in stdout


def test_bench_trl_baseline_trains_the_same_loss(tmp_path, four_pairs):
    pytest.importorskip("trl")
    stdout, r = bench(tmp_path, *four_pairs, "--seconds", "0.5", "--baseline", "trl")
    assert set(r["trl"]) == {"packing", "padding_free", "padded", "grouped"}
    first = r["jax"]["loss_first_last"][0]
    for mode, t in r["trl"].items():  # completion-only loss on the same examples and weights: jaxtune's loss
        assert t["loss_first_last"][0] == pytest.approx(first, abs=SAME_LOSS), mode
        assert t["steps_timed"] >= 2 and t["useful_tokens_per_s"] > 0
    assert r["trl"]["packing"]["real_token_share"] == r["trl"]["padding_free"]["real_token_share"] == 1
    assert r["trl"]["padded"]["real_token_share"] < 1
    best = r["trl_best_mode"]
    assert all(r["trl"][best]["useful_tokens_per_s"] >= t["useful_tokens_per_s"] for t in r["trl"].values())
    assert r["speedup_useful_tokens"] == r["jax"]["useful_tokens_per_s"] / r["trl"][best]["useful_tokens_per_s"]
    assert f"jaxtune / trl ({best}" in stdout and all(f"trl {m}" in stdout for m in r["trl"])


def test_bench_trl_missing_says_how_to_install(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "trl.py").write_text("raise ImportError(\"No module named 'trl'\")\n")  # shadows an installed trl
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(ROOT)])}
    p = subprocess.run([sys.executable, "-m", "jaxtune.bench", "--model", "tiny", "--baseline", "trl"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert p.returncode == 2 and "pip install trl" in p.stderr


def test_bench_first_step_cold_then_warm_from_the_compilation_cache(tmp_path):
    stdout, r = bench(tmp_path, "--first-step", "--batch", "2", "--max-length", "128")
    cold, warm = r["cold"], r["warm"]
    assert cold["compilation_cache_hits"] == 0 and cold["compile_s"] > 0
    assert warm["compilation_cache_hits"] > 0  # the second process loads the first one's programs
    assert warm["compiled_programs"] == cold["compiled_programs"] == 1
    assert r["warm_first_step_s"] == warm["first_step_s"] and r["cold_first_step_s"] == cold["first_step_s"]
    assert warm["process_to_first_step_s"] > warm["first_step_s"] > 0
    for side in (cold, warm):  # the first step splits into the time until its program was ready and its execution
        assert 0 < side["first_step_ready_s"] < side["first_step_s"]
        assert side["first_execution_s"] == pytest.approx(side["first_step_s"] - side["first_step_ready_s"])
    assert warm["first_step_ready_s"] < cold["first_step_ready_s"]  # loading the program beats compiling it
    for side in (cold, warm):  # the first step's kernel time is its own: its buffers are new, a later step's reused
        assert side["first_step_cpu_system_s"] > 0 and side["first_step_page_faults"] > side["page_faults_per_step"]
    assert "cold: first step" in stdout and "warm: first step" in stdout and "in the kernel" in stdout
    again = warm["same_process_again"]  # a new Trainer in the same process runs the step already compiled
    assert again["programs_compiled_or_loaded"] == 0 and again["first_step_ready_s"] == 0
    assert r["same_process_first_step_s"] == again["first_step_s"] > 0 and "again in the warm process" in stdout


def test_bench_plans_adapter_memory(tmp_path):
    plans = {}
    for name, args in (("full", []), ("lora", ["--lora-rank", "8"]), ("nf4", ["--lora-rank", "8", "--quantize", "nf4"]),
                       ("nf4_remat", ["--lora-rank", "8", "--quantize", "nf4", "--remat"])):
        stdout, r = bench(tmp_path, "--plan-memory", "--seq", "64", "--batch", "1", "--dtype", "bfloat16", *args)
        plans[name] = r["plan_gib"]
        assert r["method"].split()[0] in stdout
    # arguments: float32 weights and two AdamW moments (full); a bf16 base and tiny adapters (LoRA); nf4 codes (QLoRA)
    assert plans["lora"]["arguments"] < plans["full"]["arguments"] / 2
    assert plans["nf4"]["arguments"] < plans["lora"]["arguments"]
    assert plans["nf4_remat"]["arguments"] == plans["nf4"]["arguments"]


def test_repeats_keep_each_sides_fastest_run():
    from jaxtune.bench import _faster

    kept = None
    for rate, loss in ((10.0, 3.0), (30.0, 2.0), (20.0, 1.0)):
        kept = _faster(kept, {"useful_tokens_per_s": rate, "loss_first_last": [loss, loss]})
    assert kept["useful_tokens_per_s"] == 30.0 and kept["loss_first_last"] == [2.0, 2.0]  # one run's figures, whole
    assert kept["runs_useful_tokens_per_s"] == [10.0, 30.0, 20.0]


def test_gpu_script_stops_at_once_without_a_gpu(tmp_path):
    """benchmarks/gpu.sh on a machine whose JAX has no GPU: exit 2 within seconds, saying why and what to install,
    and no output folder written."""
    out = tmp_path / "gpu-figures"
    p = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"), str(out)],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "JAX sees no GPU here" in p.stderr and "jax[cuda12]" in p.stderr
    assert not out.exists()


def test_product_rate_counts_the_step_products_xla_counts(tmp_path):
    """benchmarks/product_rate.py's FLOP count of a step's products against XLA's own cost analysis of the compiled
    step: equal up to the element-wise work XLA also counts (a few percent at this width)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from product_rate import product_flops

    from jaxtune.checkpoint import offline_tokenizer
    from jaxtune.config import GPT2Config, TrainConfig
    from jaxtune.data import read_pairs
    from jaxtune.model import build
    from jaxtune.train import Trainer

    config = GPT2Config(n_positions=128, n_embd=256, n_layer=2, n_head=4)
    cfg = TrainConfig(batch_size=2, max_length=128, pack=True, buckets=(128,), dropout=False, warmup_steps=0)
    trainer = Trainer(build(config, seed=0), offline_tokenizer(), read_pairs(ROOT / "examples/customer_service.jsonl"), cfg)
    _, batch = next(trainer._batches(0))
    compiled = trainer.lower_step(batch).compile()
    xla = compiled.cost_analysis()["flops"]
    ours = product_flops(config, batch)
    assert ours <= xla <= 1.15 * ours, (ours, xla)
