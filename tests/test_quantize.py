"""QLoRA: the frozen base held in int8 or NF4 and dequantized inside each product.

NF4's levels are checked against the values the QLoRA paper (Dettmers et al. 2023, appendix E) and bitsandbytes
publish; every code is checked to be the nearest level; the quantized model's logits equal those of the same model
with its kernels dequantized explicitly; a QLoRA run trains only the adapters, holds the base in 4.5 bits per weight,
and its merged export (dequantized base + adapters) gives the trained model's logits in PyTorch transformers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxtune import TrainConfig, Trainer, load
from jaxtune.lora import LoRAParam, add_lora, merge
from jaxtune.quantize import (NF4_BLOCK, QuantState, dequantize_array, dequantized, is_quantized, nf4_levels,
                              quantize_array, quantize_base, quantized_bytes)

from conftest import torch_logits
from test_cli import PAIRS, run, write_jsonl
from test_lora import IDS, QA, peft_logits

PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def test_nf4_levels_are_the_papers_and_every_weight_takes_its_nearest_level():
    assert np.abs(nf4_levels() - PUBLISHED_NF4).max() < 1e-6
    w = np.random.default_rng(0).normal(0, 0.02, (48, 40)).astype(np.float32)  # 1920 values: 30 blocks of 64
    w[0, :5] = 0.0
    codes, absmax = quantize_array(w, "nf4")
    assert codes.dtype == np.uint8 and codes.size == w.size // 2 and absmax.shape == (w.size // NF4_BLOCK,)
    got = np.asarray(dequantize_array(jnp.asarray(codes), jnp.asarray(absmax), "nf4", w.shape))
    blocks = w.reshape(-1, NF4_BLOCK) / absmax[:, None]
    nearest = np.asarray(PUBLISHED_NF4)[np.abs(blocks[..., None] - np.asarray(PUBLISHED_NF4)).argmin(-1)]
    np.testing.assert_allclose(got.reshape(-1, NF4_BLOCK), nearest * absmax[:, None], rtol=1e-6, atol=1e-9)
    assert np.all(got[0, :5] == 0) and np.abs(got).max() == np.abs(w).max()  # zero and each block's max are exact


def test_int8_is_per_column_and_within_half_a_step():
    w = np.random.default_rng(1).normal(0, 0.02, (32, 24)).astype(np.float32)
    w[:, 3] *= 100  # one large column must not coarsen the others
    codes, scale = quantize_array(w, "int8")
    assert codes.dtype == np.int8 and scale.shape == (24,)
    got = np.asarray(dequantize_array(jnp.asarray(codes), jnp.asarray(scale), "int8", w.shape))
    assert np.all(np.abs(got - w) <= scale / 2 + 1e-9)
    assert np.abs(got - w)[:, :3].max() < np.abs(w[:, :3]).max() / 200


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_the_quantized_model_computes_with_exactly_the_dequantized_weights(hf_dir, kind):
    model, _ = load(str(hf_dir))
    float_bytes = sum(layer.kernel[...].nbytes for b in model.h for layer in (b.attn.c_attn, b.attn.c_proj,
                                                                               b.mlp.c_fc, b.mlp.c_proj))
    add_lora(model, 4, targets=("c_attn", "c_proj"))
    quantize_base(model, kind)
    assert is_quantized(model) and not is_quantized(dequantized(model))
    bits = 8 if kind == "int8" else 4
    assert quantized_bytes(model) <= float_bytes * (bits + 1) / 32  # scales add <= 1 bit per weight here
    x = jnp.asarray(IDS)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(dequantized(model)(x)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # quantizing did change the model: the float base gives other logits
        base = torch_logits(transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval(), IDS)
    assert np.abs(np.asarray(model(x)) - base).max() > 1e-4


def test_a_qlora_run_trains_only_the_adapters_on_a_4bit_base(hf_dir):
    model, tok = load(str(hf_dir))
    trainer = Trainer(model, tok, QA, TrainConfig(epochs=6, batch_size=4, max_length=48, learning_rate=1e-2,
                                                  lora_rank=4, lora_targets=("c_attn", "c_fc"), dropout=False,
                                                  quantize="nf4"))
    codes = [x for x in jax.tree.leaves(trainer.frozen) if x.dtype == jnp.uint8]
    assert len(codes) == 2 * 4  # two blocks x four projections, all held in 4 bits
    before = [np.asarray(c) for c in codes]
    result = trainer.run()
    assert result.history[-1].loss < result.history[0].loss - 0.3
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, codes))  # the base did not move
    assert {type(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))} >= {LoRAParam, QuantState}
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.params))
    assert sum(x.nbytes for x in jax.tree.leaves(trainer.opt_state)) < 2 * adapter_bytes + 64


def test_bf16_qlora_keeps_the_codes_and_trains(hf_dir):
    model, tok = load(str(hf_dir))
    trainer = Trainer(model, tok, QA[:8], TrainConfig(epochs=4, batch_size=4, max_length=48, learning_rate=1e-2,
                                                      lora_rank=4, dropout=False, quantize="int8", dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {jnp.dtype(jnp.int8), jnp.dtype(jnp.bfloat16)}
    result = trainer.run()
    assert result.history[-1].loss < result.history[0].loss


def test_qlora_through_the_command_line_exports_a_merged_model_and_a_peft_adapter(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = tmp_path / "run"
    p = run("train", "--model", str(hf_dir), "--data", str(data), "--output", str(out), "--epochs", "3",
            "--batch-size", "4", "--max-length", "48", "--learning-rate", "1e-2", "--lora-rank", "4",
            "--quantize", "nf4", "--merge")
    assert p.returncode == 0, p.stderr
    assert "nf4" in p.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(hf_dir) and cfg["r"] == 4
    # what the run computed with: the nf4 base with the trained adapters
    model, tok = load(str(hf_dir))
    add_lora(model, 4)
    quantize_base(model, "nf4")
    trained, _ = load(str(out))
    nnx.update(model, nnx.state(trained, LoRAParam))
    ours = np.asarray(model(jnp.asarray(IDS)))
    merged = transformers.GPT2LMHeadModel.from_pretrained(out / "merged").eval()
    np.testing.assert_allclose(torch_logits(merged, IDS), ours, atol=1e-4)
    np.testing.assert_allclose(np.asarray(merge(model)(jnp.asarray(IDS))), ours, atol=1e-4)
    # the adapter itself is a plain PEFT LoRA adapter: on the float base it gives jaxtune's unquantized logits
    np.testing.assert_allclose(peft_logits(hf_dir, out), np.asarray(trained(jnp.asarray(IDS))), atol=1e-4)


def test_quantize_needs_a_lora_rank_and_a_known_kind():
    with pytest.raises(ValueError, match="set lora_rank too"):
        TrainConfig(quantize="nf4")
    with pytest.raises(ValueError, match="choose one of none, int8, nf4"):
        TrainConfig(lora_rank=4, quantize="fp4")
    p = run("train", "--model", "tiny", "--data", "x.jsonl", "--quantize", "nf4")
    assert p.returncode != 0 and "lora_rank" in p.stderr and "Traceback" not in p.stderr


def test_a_qlora_run_resumes_exactly_and_refuses_another_quantization(tmp_path, hf_dir):
    import shutil

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    common = ["--model", str(hf_dir), "--data", str(data), "--epochs", "3", "--batch-size", "4", "--max-length", "48",
              "--learning-rate", "1e-2", "--lora-rank", "4", "--quantize", "int8", "--seed", "3"]
    full = run("train", *common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    cut = run("train", *common, "--output", str(tmp_path / "cut"), "--save-every", "4")
    assert cut.returncode == 0, cut.stderr
    for step in ("8", "9"):  # back to step 4 (9 is the finished run's last step)
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / step)
    other = run("train", "--resume", str(tmp_path / "cut"), "--quantize", "nf4")
    assert other.returncode != 0 and "quantize: 'int8' -> 'nf4'" in other.stderr, other.stderr
    resumed = run("train", "--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0 and "at step 4/9" in resumed.stderr, resumed.stderr
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("cut") == losses("full")
