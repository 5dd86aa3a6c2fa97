"""Model cards and tidy exports: what every saved model carries, an untied head through transformers, and pushing
to the hub over HTTP against a local stand-in of its API (a good token and a refused one)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
import yaml

from jaxtune.card import model_card, push
from jaxtune.checkpoint import load, save
from jaxtune.config import GPT2Config

from conftest import make_hf_model, torch_logits
from hub_standin import GOOD_TOKEN, HubStandIn
from test_cli import PAIRS, run, write_jsonl


def front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_trained_model_carries_its_card_and_tidy_configs(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    p = run("train", "--model", str(hf_dir), "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "2",
            "--batch-size", "4", "--max-length", "48", "--validation-fraction", "0.25", "--learning-rate", "3e-3")
    assert p.returncode == 0, p.stderr
    card = (tmp_path / "run" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "jaxtune" in meta["tags"] and "base_model" not in meta  # a local base
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "| training data | 9 pairs |" in card and "| validation data | 3 pairs |" in card
    assert f"| steps | {len(metrics)} |" in card and f"| final training loss | {metrics[-1]['loss']:.4f} |" in card
    assert f"| validation loss after | {metrics[-1]['val_loss']:.4f} |" in card
    assert "Instruction: {instruction}\\nResponse: {response}" in card and "GPT2LMHeadModel.from_pretrained" in card
    config_yaml = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written.pop("output") == str(tmp_path / "run") and config_yaml == written  # the folder stays home
    assert "`python -m jaxtune train --config config.yaml --output NEW_FOLDER` repeats it" in card
    tok_cfg = json.loads((tmp_path / "run" / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 64  # the model's n_positions, not ~1e30
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "run").model_max_length == 64
    gen = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == 50256


def test_card_metadata_for_hub_bases_and_data_sets():
    card = model_card(GPT2Config(), run={"base_model": "gpt2", "config": {"data": "acme/helpdesk", "train": {}},
                                         "pairs": 10, "steps": 5}, repo_id="me/helpdesk-gpt2",
                      evaluation=[{"model": "tuned", "rouge_l": 0.5, "stop_rate": 1.0}])
    meta = front_matter(card)
    assert meta["base_model"] == "gpt2" and meta["license"] == "mit" and meta["datasets"] == ["acme/helpdesk"]
    assert "# helpdesk-gpt2" in card and '"me/helpdesk-gpt2"' in card
    assert "| tuned | 0.5000 | 1.0000 |" in card
    assert "base_model" not in front_matter(model_card(GPT2Config(), run={"base_model": "tiny"}))


def test_an_untied_head_round_trips_through_transformers(tmp_path):
    make_hf_model(tmp_path / "untied", tie_word_embeddings=False)
    model, tok = load(str(tmp_path / "untied"))
    out = save(model, tok, tmp_path / "saved")
    pt = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert not pt.config.tie_word_embeddings
    ids = np.array([[15496, 995, 11, 314, 716]], np.int32)
    assert np.abs(torch_logits(pt, ids) - np.asarray(model(jnp.asarray(ids)))).max() < 1e-4


def test_push_uploads_the_model_and_its_card_and_reports_a_refusal(tmp_path, hf_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # this "hub" is a loopback server
    model, tok = load(str(hf_dir))
    out = save(model, tok, tmp_path / "model")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "big.bin").write_bytes(b"x" * 100)  # training state: never uploaded
    (out / "checkpoints" / "0").mkdir()
    (out / "checkpoints" / "0" / "state.bin").write_bytes(b"x" * 100)
    (out / "config.yaml").write_text(yaml.safe_dump({"model": "tiny", "data": "d.jsonl", "output": "/home/me/run"}))
    hub = HubStandIn()
    try:
        url = push(out, "me/helpdesk", token=GOOD_TOKEN, endpoint=hub.url)
        files = hub.repos["me/helpdesk"]["files"]
        assert url.endswith("/me/helpdesk") and hub.repos["me/helpdesk"]["private"] is True
        assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert not any(f.startswith(("checkpoints", ".")) for f in files)
        assert yaml.safe_load(files["config.yaml"]) == {"model": "tiny", "data": "d.jsonl"}  # the folder stays home
        assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
        assert files["README.md"].decode() == (out / "README.md").read_text()
        assert hub.cards and hub.cards[-1]["library_name"] == "transformers"  # the card's metadata passed validation
        from huggingface_hub.errors import HfHubHTTPError

        with pytest.raises(HfHubHTTPError, match="401"):
            push(out, "me/other", token="hf_wrong", endpoint=hub.url)
        assert "me/other" not in hub.repos
        with pytest.raises(ValueError, match="user/name"):
            push(out, "no-owner", token=GOOD_TOKEN, endpoint=hub.url)
    finally:
        hub.close()


def test_push_uploads_a_lora_adapter_and_hub_reachable_follows_hf_endpoint(tmp_path, hf_dir, monkeypatch):
    """An adapter folder (PEFT files, card) pushes like a model; `hub_reachable` asks $HF_ENDPOINT when it is set
    (the stand-in answers; a port nothing listens on does not)."""
    import huggingface_hub.constants

    from jaxtune.checkpoint import hub_reachable
    from jaxtune.lora import add_lora

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, tok = load(str(hf_dir))
    out = save(add_lora(model, 2), tok, tmp_path / "adapter", adapter_base=str(hf_dir))
    hub = HubStandIn()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert hub_reachable(timeout=2)
        push(out, "me/adapter", token=GOOD_TOKEN, endpoint=hub.url, ignore=("tokenizer*",))
        files = hub.repos["me/adapter"]["files"]
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
        assert not any(f.startswith("tokenizer") for f in files)
        assert hub.cards[-1]["library_name"] == "peft"
    finally:
        hub.close()
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{free.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    assert not hub_reachable(timeout=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable(timeout=2, endpoint=hub.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="nothing to push"):
        push(tmp_path / "empty", "me/x", token=GOOD_TOKEN, endpoint=hub.url)
