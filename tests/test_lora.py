"""LoRA against PyTorch PEFT: adapters trained by jaxtune load in PEFT with the same logits, adapters made by PEFT
load in jaxtune with the same logits, merging changes nothing, and only the adapters train."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxtune import Pair, TrainConfig, Trainer, load
from jaxtune.checkpoint import ModelLoadError, save
from jaxtune.rundir import RunDirError
from jaxtune.train import TrainingError
from jaxtune.lora import LoRAParam, merge

from conftest import torch_logits
from test_cli import PAIRS, run, write_jsonl

IDS = np.array([[15496, 995, 11, 314, 716, 257, 1332]], np.int32)
QA = [Pair(f"Where is order {n}?", f"Order {n} is on its way.") for n in range(16)]


def peft_logits(base_dir, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(hf_dir):
    model, tok = load(str(hf_dir))
    before = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    trainer = Trainer(model, tok, QA, TrainConfig(epochs=6, batch_size=4, max_length=48, learning_rate=1e-2,
                                                  lora_rank=4, lora_targets=("c_attn", "c_fc"), dropout=False))
    result = trainer.run()
    assert result.history[-1].loss < result.history[0].loss - 0.3
    after = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the base is frozen
    adapters = jax.tree.leaves(trainer.params)
    assert len(adapters) == 2 * 2 * 2  # two layers x two targets x (A, B)
    adapter_bytes = sum(x.nbytes for x in adapters)
    moments = sum(x.nbytes for x in jax.tree.leaves(trainer.opt_state) if x.ndim >= 2)
    assert moments == 2 * adapter_bytes  # AdamW's two moments, of the adapters only
    assert sum(x.nbytes for x in jax.tree.leaves(trainer.opt_state)) < 2 * adapter_bytes + 64
    trained = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    assert any(np.abs(np.asarray(v)).max() > 0 for k, v in trained.items() if k[-1] == "lora_b")


def test_a_jaxtune_adapter_loads_in_peft_and_merges_to_the_same_model(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = tmp_path / "run"
    p = run("train", "--model", str(hf_dir), "--data", str(data), "--output", str(out), "--epochs", "3",
            "--batch-size", "4", "--max-length", "48", "--learning-rate", "1e-2", "--lora-rank", "4",
            "--lora-targets", "c_attn", "c_proj", "--merge")
    assert p.returncode == 0, p.stderr
    assert "LoRA: rank 4 on c_attn, c_proj" in p.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == str(hf_dir) and not (out / "model.safetensors").exists()
    model, _ = load(str(out))
    ours = np.asarray(model(jnp.asarray(IDS)))
    assert np.abs(ours - np.asarray(load(str(hf_dir))[0](jnp.asarray(IDS)))).max() > 1e-3  # it learned something
    assert np.abs(peft_logits(hf_dir, out) - ours).max() < 1e-4
    merged = transformers.GPT2LMHeadModel.from_pretrained(out / "merged").eval()
    assert np.abs(torch_logits(merged, IDS) - ours).max() < 1e-4
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained" in card
    g = run("generate", "--model", str(out), "--instruction", PAIRS[0]["instruction"], "--max-new-tokens", "8")
    assert g.returncode == 0, g.stderr


def test_a_peft_adapter_loads_in_jaxtune_with_its_base_or_another(tmp_path, hf_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pt = get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(hf_dir),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                                   init_lora_weights=False, task_type="CAUSAL_LM"))  # random A and B: a real delta
    pt.save_pretrained(tmp_path / "adapter")
    expected = peft_logits(hf_dir, tmp_path / "adapter")
    model, _ = load(str(tmp_path / "adapter"))
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - expected).max() < 1e-4
    assert np.abs(np.asarray(merge(model)(jnp.asarray(IDS))) - expected).max() < 1e-4
    shutil.copytree(hf_dir, tmp_path / "moved_base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "somewhere/else"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    model, _ = load(str(tmp_path / "adapter"), base=str(tmp_path / "moved_base"))  # --base overrides the config
    assert np.abs(np.asarray(model(jnp.asarray(IDS))) - expected).max() < 1e-4
    with pytest.raises(ModelLoadError, match="is for a LoRA adapter folder, and .*moved_base is not one"):
        load(str(tmp_path / "moved_base"), base=hf_dir)  # a full model: --base would be ignored, so it is refused


def test_peft_options_jaxtune_cannot_compute_are_refused_and_an_adapter_cannot_be_its_own_base(tmp_path, hf_dir):
    """An adapter with alpha_pattern loaded and gave other logits than PEFT's (1.41 apart), one with rank_pattern
    failed on a broadcast, and one whose config named its own folder as the base recursed without end."""
    from peft import LoraConfig, get_peft_model

    for name, extra, said in (("alpha", dict(alpha_pattern={"c_proj": 64}), "alpha_pattern={'c_proj': 64}"),
                              ("rank", dict(rank_pattern={"c_proj": 2}), "rank_pattern={'c_proj': 2}"),
                              ("layers", dict(layers_to_transform=[1]), "layers_to_transform=[1]"),
                              ("bias", dict(bias="lora_only"), "bias='lora_only'")):
        get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(hf_dir),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                  **extra)).save_pretrained(tmp_path / name)
        with pytest.raises(ModelLoadError, match=f"{name}: {re.escape(said)} is not supported by jaxtune's LoRA"):
            load(str(tmp_path / name))
    cfg = json.loads((tmp_path / "bias" / "adapter_config.json").read_text())
    cfg.update(bias="none", base_model_name_or_path=str(tmp_path / "bias"))
    (tmp_path / "bias" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="the adapter names its own folder as its base model"):
        load(str(tmp_path / "bias"))


def test_python_saves_keep_the_base_an_adapter_names_and_a_lora_model_trains_only_its_own_settings(tmp_path, hf_dir,
                                                                                                 monkeypatch):
    """In Python: adapters saved into their base's folder replaced the base and left a folder that could not load;
    adapters trained after a full fine-tune named the base on disk, whose weights were no longer theirs (logits 2.76
    apart); a second LoRA training with another rank went on with the first one's adapters without a word."""
    shutil.copytree(hf_dir, tmp_path / "mine")
    model, tok = load(str(tmp_path / "mine"))
    cfg = dict(max_steps=2, max_length=48, learning_rate=1e-2, warmup_steps=0, batch_size=4)
    Trainer(model, tok, QA, TrainConfig(**cfg, lora_rank=4)).run()
    before = sorted(p.name for p in (tmp_path / "mine").iterdir())
    with pytest.raises(RunDirError, match=r"mine is where the adapters' base model is .*: saving the adapters there "
                                          "would replace the base they name"):
        save(model, tok, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == before
    with pytest.raises(TrainingError, match=r"other settings than these \(lora_rank: 4 -> 8; lora_alpha: 8.0 -> 16.0\)"):
        Trainer(model, tok, QA, TrainConfig(**cfg, lora_rank=8))
    Trainer(model, tok, QA, TrainConfig(**cfg, lora_rank=4, lora_targets=("c_proj", "c_attn")))  # the same adapters

    model, tok = load(str(tmp_path / "mine"))
    Trainer(model, tok, QA, TrainConfig(**cfg)).run()  # full fine-tuning: no longer the weights in mine/
    Trainer(model, tok, QA, TrainConfig(**cfg, lora_rank=4)).run()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    saved = save(model, tok, "~/adapter")  # ~ is the home folder, as load reads it
    assert saved == tmp_path / "home" / "adapter"
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    again, _ = load("~/adapter")  # the fine-tuned base travels with its adapters
    assert np.abs(np.asarray(again(jnp.asarray(IDS))) - np.asarray(model(jnp.asarray(IDS)))).max() < 1e-5
    with pytest.raises(TypeError, match="give the model, then its tokenizer.*got GPT2Tokenizer and GPT2LMHeadModel"):
        save(tok, model, tmp_path / "swapped")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".swapped")]  # no half-made folder left


def test_a_lora_run_resumes_exactly_and_on_the_embedded_model_keeps_its_base(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    common = ["--model", "tiny", "--data", str(data), "--epochs", "3", "--batch-size", "4", "--max-length", "48",
              "--learning-rate", "1e-2", "--lora-rank", "4", "--seed", "3"]
    full = run("train", *common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    cut = run("train", *common, "--output", str(tmp_path / "cut"), "--save-every", "4")
    assert cut.returncode == 0, cut.stderr
    for step in ("8", "9"):  # back to step 4 (9 is the finished run's last step)
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / step)
    resumed = run("train", "--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0 and "at step 4/9" in resumed.stderr, resumed.stderr
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("cut") == losses("full")
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    model, _ = load(str(tmp_path / "full"))  # the embedded model's random base was written beside the adapter
    assert np.abs(peft_logits(tmp_path / "full" / "base", tmp_path / "full") - np.asarray(model(jnp.asarray(IDS)))).max() < 1e-4


def test_lora_with_packing_and_accumulation_in_bfloat16_keeps_float32_adapters(hf_dir):
    """Packed rows, two micro-batches a step, bf16 compute: the base is held in bf16 (half its bytes), the adapters
    and their optimizer state stay float32, and the loss falls."""
    model, tok = load(str(hf_dir))
    trainer = Trainer(model, tok, QA, TrainConfig(epochs=10, batch_size=2, max_length=64, learning_rate=1e-2, pack=True,
                                                  grad_accum=2, dtype="bfloat16", lora_rank=4, dropout=False))
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype(jnp.float32)}
    result = trainer.run()
    assert result.history[-1].loss < result.history[0].loss - 0.3


def test_lora_dropout_acts_in_training_only_and_is_recorded(tmp_path, hf_dir):
    from jaxtune.lora import add_lora, save_adapter

    model, _ = load(str(hf_dir))
    add_lora(model, 4, 8, ["c_attn", "c_fc"], dropout=0.5)
    for path, v in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if path[-1] == "lora_b":
            v.set_value(jnp.full(v.get_value().shape, 0.1))
    plain, _ = load(str(hf_dir))
    add_lora(plain, 4, 8, ["c_attn", "c_fc"], dropout=0.0)
    nnx.update(plain, nnx.state(model, LoRAParam))
    ids = jnp.asarray(IDS)
    assert np.array_equal(np.asarray(model(ids)), np.asarray(plain(ids)))  # no key: no dropout
    key = jax.random.key(0)
    assert np.abs(np.asarray(model(ids, dropout_rng=key)) - np.asarray(plain(ids, dropout_rng=key))).max() > 1e-3
    save_adapter(model, tmp_path, base_model=str(hf_dir))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.5


def test_an_unusual_gpt2_trains_an_adapter_peft_reads_and_reads_peft_adapters(tmp_path):
    """Odd widths (36 wide, 3 heads of 12, MLP 80), relu, scaled attention and an untied head: a jaxtune adapter
    trained through the command line (QLoRA nf4 too: c_attn's 36 x 108 weights are no whole number of NF4's
    blocks of 64) reads in PEFT with jaxtune's logits, and an adapter PEFT trained on all four projections
    loads in jaxtune and `generate` runs on it."""
    from peft import LoraConfig, get_peft_model

    from conftest import make_hf_model

    base = tmp_path / "odd"
    make_hf_model(base, seed=5, n_embd=36, n_head=3, n_inner=80, activation_function="relu", n_layer=3,
                  scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False, n_positions=96)
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    for quantize in ("none", "nf4"):
        out = tmp_path / f"run-{quantize}"
        p = run("train", "--model", str(base), "--data", str(data), "--output", str(out), "--epochs", "2",
                "--batch-size", "4", "--max-length", "48", "--learning-rate", "1e-2", "--lora-rank", "2",
                "--lora-targets", "c_attn", "c_fc", "mlp.c_proj", "--quantize", quantize)
        assert p.returncode == 0, p.stderr
        ours = np.asarray(load(str(out))[0](jnp.asarray(IDS)))
        np.testing.assert_allclose(peft_logits(base, out), ours, atol=1e-4)
    torch.manual_seed(1)
    pt = get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base),
                        LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                   init_lora_weights=False, task_type="CAUSAL_LM"))
    pt.save_pretrained(tmp_path / "peft")
    model, _ = load(str(tmp_path / "peft"))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), peft_logits(base, tmp_path / "peft"), atol=1e-4)
    g = run("generate", "--model", str(tmp_path / "peft"), "--instruction", "Where is my order?", "--max-new-tokens", "4")
    assert g.returncode == 0, g.stderr
