"""Loading and saving Hugging Face directories; the hub path, the embedded model and their errors."""

import json
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxtune.checkpoint import EMBEDDED, ModelLoadError, load, save

from conftest import torch_logits

IDS = np.array([[15496, 995, 11, 314, 716, 257, 1332]], np.int32)


def test_offline_tokenizer(tokenizer):
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "right"


def test_saved_model_loads_in_pytorch(hf_dir, tmp_path):
    model, tok = load(str(hf_dir))
    out = save(model, tok, tmp_path / "saved")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert all(k.startswith("transformer.") for k in load_file(out / "model.safetensors"))
    pt = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert np.abs(torch_logits(pt, IDS) - np.asarray(model(jnp.asarray(IDS)))).max() < 1e-4
    pt_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert pt_tok("Hello world").input_ids == [15496, 995]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"]  # readable as the other files are (it was 0600)


def test_save_replaces_a_model_folder_but_not_a_training_run_unless_told(hf_dir, tmp_path):
    """Saving twice into one folder replaces the model; a training run's folder (its metrics, config, checkpoints)
    is replaced only with overwrite=True: `save` into a run's folder deleted its records without a word."""
    from jaxtune.rundir import RunDirError

    model, tok = load(str(hf_dir))
    save(model, tok, tmp_path / "plain")
    save(model, tok, tmp_path / "plain")  # a model alone: replaced, as before
    run = save(model, tok, tmp_path / "run", extra_files={"metrics.jsonl": '{"step": 1}\n', "config.yaml": "x: 1\n"})
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RunDirError, match=r"holds a training run \(config.yaml, metrics.jsonl\); saving a model "
                                          r"there would replace the run .* pass overwrite=True"):
        save(model, tok, run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    save(model, tok, run, overwrite=True)
    assert not (run / "metrics.jsonl").exists() and (run / "model.safetensors").exists()
    (run / "checkpoints").mkdir()  # a folder inside a run, given for the run: the message names the run
    with pytest.raises(ModelLoadError, match=f"checkpoints: no config.json; .* it lies inside the model directory "
                                             f"{re.escape(str(run))}: give that"):
        load(str(run / "checkpoints"))


def test_a_lora_model_saved_from_python_names_a_base_that_loads(hf_dir, tmp_path):
    """jaxtune.save of a LoRA model: on the embedded model (whose weights exist nowhere else) the base is written
    beside the adapter, as the command line does; on a model folder the adapter names that folder. The adapter
    named 'tiny (embedded offline model: ...)', which nothing could load."""
    import json

    from jaxtune.lora import add_lora

    for name in ("tiny", str(hf_dir)):
        model, tok = load(name)
        add_lora(model, 2, seed=1)
        for layer in [m for _, m in model.iter_modules() if hasattr(m, "lora")]:  # B = 0 would hide a lost adapter
            layer.lora.lora_b[...] = jnp.full_like(layer.lora.lora_b[...], 0.05)
        out = save(model, tok, tmp_path / f"adapter-{len(name)}")
        named = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert named == ("base" if name == "tiny" else str(hf_dir.resolve())), named
        again, _ = load(str(out))
        assert np.abs(np.asarray(again(jnp.asarray(IDS))) - np.asarray(model(jnp.asarray(IDS)))).max() < 1e-5
        resaved = save(again, tok, tmp_path / f"again-{len(name)}")  # a loaded adapter names its base again
        assert json.loads((resaved / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            (str((out / "base").resolve()) if name == "tiny" else str(hf_dir.resolve()))


def test_a_gpt2_tokenizer_loads_without_pytorch_and_another_class_through_auto(hf_dir, tmp_path):
    """A launch reads GPT-2's tokenizer without importing PyTorch (AutoTokenizer would: a second more on every
    start); a folder naming another tokenizer class still gets that class, as AutoTokenizer gives it."""
    probe = ("import sys; from jaxtune.checkpoint import load; m, tok = load(sys.argv[1]); "
             "print(tok('Hello world').input_ids, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(hf_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "[15496, 995] False", out.stdout + out.stderr
    other = tmp_path / "other"
    shutil.copytree(hf_dir, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
    _, tok = load(str(other))
    assert type(tok) is type(transformers.AutoTokenizer.from_pretrained(other)) is transformers.PreTrainedTokenizerFast
    assert tok("Hello world").input_ids == [15496, 995] and tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_hub_layout_without_prefix_and_with_buffers(hf_dir, tmp_path, torch_model):
    """The hub's gpt2 stores keys without 'transformer.' and ships attn.bias buffers: both are handled."""
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(hf_dir / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors["h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model, _ = load(str(tmp_path))  # no tokenizer files: falls back to the offline GPT-2 tokenizer
    assert np.abs(torch_logits(torch_model, IDS) - np.asarray(model(jnp.asarray(IDS)))).max() < 1e-4


def test_pickle_needs_explicit_permission(hf_dir, tmp_path, torch_model):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        load(str(tmp_path))
    model, _ = load(str(tmp_path), allow_pickle=True)
    assert np.abs(torch_logits(torch_model, IDS) - np.asarray(model(jnp.asarray(IDS)))).max() < 1e-4


def test_hub_id_is_read_from_the_huggingface_cache(hf_dir, tmp_path, monkeypatch, torch_model):
    """A hub id resolves through huggingface_hub's cache layout (models--org--name/snapshots/<rev>)."""
    repo = tmp_path / "hub" / "models--acme--tiny-gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(hf_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tok = load("acme/tiny-gpt2")
    assert model.source == "acme/tiny-gpt2 (Hugging Face hub)"
    assert model.origin == "acme/tiny-gpt2"  # what a LoRA save of it names as the base (see save)
    assert np.abs(torch_logits(torch_model, IDS) - np.asarray(model(jnp.asarray(IDS)))).max() < 1e-4


def test_unknown_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="'no-such-org/no-such-model': no folder no-such-org/no-such-model here, "
                                             "and not in the local Hugging Face cache, and the hub cannot be reached"):
        load("no-such-org/no-such-model")  # a mistyped relative folder reads as a hub id: both are said
    with pytest.raises(ModelLoadError, match="model 'nosuchmodel': not in the local Hugging Face cache"):
        load("nosuchmodel")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "missing_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(tmp_path / "empty"))
    for nothing in ("", "  ", None):  # not the working folder's config.json, nor a model called 'None'
        with pytest.raises(ModelLoadError, match=r"names no model; give a hub id \(gpt2\), a model folder"):
            load(nothing)


def test_auto_falls_back_to_the_embedded_model_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    model, tok = load("auto")
    assert "embedded" in model.source and "untrained" in model.source
    assert getattr(model, "origin", None) is None  # its weights exist nowhere else: a LoRA save copies them
    assert model.config.vocab_size == 50257 and len(tok) == 50257
    assert load(EMBEDDED)[0].source == model.source.split("using ")[1]


def test_shape_mismatch_names_the_tensor(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["n_inner"] = 100
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"tensor h\.0\.mlp\.c_fc\.(weight|bias) has shape .*the config needs"):
        load(str(tmp_path / "m"))
