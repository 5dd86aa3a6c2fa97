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
    assert written.pop("output") == str(tmp_path / "run") and written["data"] == str(data)
    assert config_yaml == {**written, "data": "d.jsonl"}  # the folders stay home: the data by its file name
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
    assert "| model | ROUGE-L | stop rate |" in card and "| tuned | 0.500 | 1.000 |" in card  # eval.md's figures
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
        local = (out / "README.md").read_text()  # the card's code loads from the repository it is pushed to
        assert 'path = "path/to/this/folder"' in local and 'path = "me/helpdesk"' not in local
        assert files["README.md"].decode() == local.replace('path = "path/to/this/folder"', 'path = "me/helpdesk"')
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
    local = save(add_lora(model, 2), tok, tmp_path / "local", adapter_base=str(hf_dir))
    out = save(add_lora(load(str(hf_dir))[0], 2), tok, tmp_path / "adapter", adapter_base="gpt2")  # a hub base
    hub = HubStandIn()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert hub_reachable(timeout=2)
        with pytest.raises(ValueError, match=f"trained on {hf_dir}, which is not on the hub: nobody who downloads"):
            push(local, "me/local", token=GOOD_TOKEN, endpoint=hub.url)  # its base is a folder on this machine
        assert "me/local" not in hub.repos
        push(out, "me/adapter", token=GOOD_TOKEN, endpoint=hub.url)
        files = hub.repos["me/adapter"]["files"]
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
        assert 'path = "me/adapter"' in files["README.md"].decode()
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


TINY = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4)
ADAPTER = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "base_model_name_or_path": "gpt2"}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_qlora_adapter_card_says_its_base_was_quantized(kind):
    """A QLoRA run's card names the adapter QLoRA and the base's quantization, and says which model is the run's own
    computation: merged/ (or the dequantized base/ beside the adapter), not the adapter on the float base."""
    run = {"base_model": "gpt2", "config": {"merge": True, "train": {"lora_rank": 4, "quantize": kind,
                                                                     "dtype": "float32"}}, "steps": 3}
    card = model_card(TINY, run=run, adapter=ADAPTER)
    assert f"is a QLoRA adapter (rank 4, alpha 8, on c_attn, c_proj) trained on an {kind}-quantized [gpt2]" in card
    assert f"| base quantization | {kind} |" in card and "| precision | float32 |" in card
    use = card[card.index("## Use it"):card.index("## Training")]
    assert "merged/, in the run's folder, is what the run computed" in use
    assert "loading the adapter on the float base, as above, gives slightly different outputs" in use
    unmerged = model_card(TINY, run={**run, "config": {**run["config"], "merge": False}}, adapter=ADAPTER)
    assert "A merged model (a run with `merge: true` writes it to merged/) is what the run computed" in unmerged
    own = model_card(TINY, run={**run, "base_model": "tiny"}, adapter={**ADAPTER, "base_model_name_or_path": "base"})
    assert f"base/ holds the base dequantized from {kind}, so the lines above compute what the run computed" in own
    plain = model_card(TINY, run={**run, "config": {"train": {"lora_rank": 4}}}, adapter=ADAPTER)
    assert "is a LoRA adapter (rank 4" in plain and "QLoRA" not in plain and "base quantization" not in plain


def test_a_stopped_or_resumed_run_says_so_and_config_yaml_only_approximates_it():
    run = {"base_model": "gpt2", "config": {"data": "d.jsonl", "train": {"epochs": 2}}, "steps": 24,
           "total_steps": 40, "stopped": "stopped by request after step 24", "resumes": []}
    card = model_card(TINY, run=run)
    assert "| steps | 24 of 40 (stopped early: stopped by request after step 24) |" in card
    assert "`python -m jaxtune train --config config.yaml --output NEW_FOLDER` repeats it" in card
    assert "| resumed |" not in card
    assert "(add `--data FILE` where its training pairs are not at `data`):" in card  # no held-out file to name
    held = model_card(TINY, run={**run, "config": {**run["config"], "validation_data": "v.jsonl"}})
    assert "(add `--data FILE` where its training pairs are not at `data`, and `--validation-data FILE` where its " \
        "held-out pairs are not at `validation_data`):" in held  # config.yaml names both files
    assert "| steps | 40 |" in model_card(TINY, run={**run, "steps": 40, "stopped": None})
    assert "| epochs | 2 |" in card  # the plan; a --max-steps that ends the run sooner is said (it read 'epochs | 20')
    cut = {**run, "config": {"train": {"epochs": 20, "max_steps": 20}}, "steps": 20, "total_steps": 20, "stopped": None,
           "cut_by_max_steps": True}
    assert "| epochs | 20, cut short: max steps 20 ends the run |" in model_card(TINY, run=cut)
    # a max steps the epochs reach anyway cut nothing: the card said they were cut short
    assert "| epochs | 20 |" in model_card(TINY, run={**cut, "cut_by_max_steps": False})
    resumed = model_card(TINY, run={**run, "steps": 40, "stopped": None, "resumes": [
        {"step": 12, "changes": ["epochs: 1 -> 2"]}, {"step": 30, "changes": ["learning_rate: 0.001 -> 0.0005"]}]})
    assert "| steps | 40 |" in resumed and "repeats it" not in resumed
    assert "| resumed | at step 12 (epochs: 1 -> 2); at step 30 (learning_rate: 0.001 -> 0.0005) |" in resumed
    assert ("The run was resumed at step 12 with epochs: 1 -> 2; at step 30 with learning_rate: 0.001 -> 0.0005, so "
            "its configuration below holds the final values: `python -m jaxtune train --config config.yaml --output "
            "NEW_FOLDER` repeats the run only approximately") in resumed
    unchanged = model_card(TINY, run={**run, "stopped": None, "resumes": [{"step": 12, "changes": []}]})
    assert "| resumed | at step 12 |" in unchanged and "repeats it (add" in unchanged
    early = model_card(TINY, run={**run, "config": {**run["config"], "early_stopping": 2}, "best_step": 16,
                                  "val_loss": 1.25, "stopped": "the validation loss had not fallen below 1.2500 "
                                  "(step 16) for 2 evaluations by step 24"})
    assert "| steps | 24 of 40 (stopped early: the validation loss had not fallen below 1.2500 (step 16)" in early
    assert "| early stopping | after 2 evaluations without a lower validation loss; the weights are step 16's |" in early
    assert "| validation loss of the weights kept (step 16, the lowest) | 1.2500 |" in early


def test_the_cards_of_a_lora_runs_base_and_merged_folders_say_what_they_hold(tmp_path):
    """A QLoRA run on the embedded model with --merge: the adapter's card says QLoRA; base/ is the untrained random
    base the adapter was trained on, without the run's losses; merged/ is the adapter merged, a full model."""
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS[:8])
    p = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "2",
            "--batch-size", "4", "--max-length", "32", "--lora-rank", "2", "--quantize", "nf4", "--merge")
    assert p.returncode == 0, p.stderr
    adapter = (tmp_path / "run" / "README.md").read_text()
    assert "is a QLoRA adapter (rank 2" in adapter and "| base quantization | nf4 |" in adapter
    base = (tmp_path / "run" / "base" / "README.md").read_text()
    assert ("is the frozen base model the QLoRA adapter in the parent folder was trained on: the embedded tiny model, "
            "GPT-2's architecture and vocabulary with random weights, untrained") in base
    assert "held in nf4; these are its dequantized float32 weights" in base
    assert "instruction-tuned" not in base and "## Training" not in base and "loss" not in base
    merged = (tmp_path / "run" / "merged" / "README.md").read_text()
    assert "is a jaxtune run's QLoRA adapter (rank 2, alpha 4.0, on c_attn, c_proj) merged into its base" in merged
    assert ("It is a full model: it loads in PyTorch `transformers` alone, without PEFT. The adapter was trained on "
            "the base quantized to nf4; it is merged into that base's dequantized float32 weights") in merged
    assert "| final training loss |" in merged and front_matter(merged)["library_name"] == "transformers"
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "merged").config.n_layer == 2


def test_role_names_a_merged_model_with_a_hub_base_and_refuses_another():
    run = {"base_model": "gpt2", "config": {"train": {"lora_rank": 8, "lora_alpha": 16, "lora_targets": ["c_attn"]}},
           "steps": 5, "final_loss": 1.5}
    merged = model_card(TINY, run=run)  # a full model from a LoRA run: its merged model, unless told otherwise
    assert merged == model_card(TINY, run=run, role="merged") and front_matter(merged)["base_model"] == "gpt2"
    assert "a jaxtune run's LoRA adapter (rank 8, alpha 16.0, on c_attn) merged into its base, [gpt2]" in merged
    base = model_card(TINY, run=run, role="base")
    assert "base_model" not in front_matter(base) and "| final training loss |" not in base
    assert "the LoRA adapter in the parent folder was trained on: gpt2" in base
    with pytest.raises(ValueError, match="role='adapter': choose one of model, base, merged"):
        model_card(TINY, run=run, role="adapter")
