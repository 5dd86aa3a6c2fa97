"""Model cards: the README.md every model jaxtune writes carries (Hugging Face metadata, how it was trained, its
metrics, the prompt format, and how to use it from PyTorch), and pushing a model folder to the hub."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import yaml

from jaxtune.config import HUB_MODELS

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_KNOWN_LICENSES = {name: "mit" for name in HUB_MODELS}  # OpenAI's GPT-2 checkpoints are MIT-licensed


def hub_id(name: str | None) -> str | None:
    """`name` if it reads as a Hugging Face hub id (gpt2, org/name), else None (a local path, 'tiny', a file)."""
    if not name or name in ("tiny", "auto") or Path(name).suffix or name.startswith((".", "/", "~")):
        return None
    return name if _HUB_ID.match(name) and not Path(name).exists() else None


def model_card(config, *, run: dict | None = None, evaluation: list[dict] | None = None, repo_id: str | None = None,
               adapter: dict | None = None) -> str:
    """README.md text. `run` (optional) describes the training: base_model, config (a RunConfig dict), pairs,
    validation_pairs, steps, seconds, device, final_loss, val_loss, initial_val_loss, tokens_per_s, source.
    `evaluation` rows come from `python -m jaxtune eval` (model, rouge_l, exact_match, stop_rate, ...)."""
    run = run or {}
    cfg = run.get("config") or {}
    base = hub_id(run.get("base_model"))
    data = hub_id(cfg.get("data"))
    meta = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation",
            "tags": ["jaxtune", "gpt2", "instruction-tuned", "jax", "flax"] + (["lora"] if adapter else [])}
    if adapter:  # the base a PEFT adapter names, if it is a hub model
        run = {**(run or {}), "base_model": (run or {}).get("base_model") or adapter.get("base_model_name_or_path")}
    if base:
        meta["base_model"] = base
        if base in _KNOWN_LICENSES:
            meta["license"] = _KNOWN_LICENSES[base]
    if data:
        meta["datasets"] = [data]
    name = repo_id or "this model"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else 'GPT-2 instruction-tuned with jaxtune'}", ""]
    what = f"a fine-tune of [{base}](https://huggingface.co/{base})" if base else (
        f"a fine-tune of {run.get('source') or run.get('base_model')}" if run.get("base_model") else "a GPT-2 model")
    if adapter:
        what = (f"a LoRA adapter (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on "
                f"{', '.join(adapter.get('target_modules') or [])}) for {what.removeprefix('a fine-tune of ')}")
    lines += [f"{name[0].upper() + name[1:]} is {what}, instruction-tuned with jaxtune in JAX "
              f"({config.n_layer} layers, {config.n_embd} wide, {config.n_head} heads, {config.n_positions} positions). "
              + ("It loads in PyTorch with PEFT." if adapter else "It loads in PyTorch `transformers` as it is."), "",
              "## Prompt format", "",
              "The model was trained on `Instruction: {instruction}\\nResponse: {response}` followed by the "
              "end-of-text token, so give it the instruction and let it complete the response; it stops by itself.", "",
              "```", "Instruction: Where is my order?", "Response:", "```", "",
              "## Use it", "", "```python",
              "from transformers import AutoTokenizer, GPT2LMHeadModel", "",
              f'path = "{repo_id or "path/to/this/folder"}"',
              "tokenizer = AutoTokenizer.from_pretrained(path)",
              *([_base_line(adapter.get("base_model_name_or_path")),
                 "from peft import PeftModel",
                 "model = PeftModel.from_pretrained(model, path)  # the LoRA adapter on top"] if adapter else
                ["model = GPT2LMHeadModel.from_pretrained(path)"]),
              'inputs = tokenizer("Instruction: Where is my order?\\nResponse:", return_tensors="pt")',
              "out = model.generate(**inputs, max_new_tokens=64, pad_token_id=tokenizer.eos_token_id)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", ""]
    if run:
        t = cfg.get("train") or {}
        facts = [("base model", run.get("source") or run.get("base_model")),
                 ("training data", f"{run['pairs']:,} pairs" + (f" from `{cfg['data']}`" if data else "") if run.get("pairs") else None),
                 ("validation data", f"{run['validation_pairs']:,} pairs" if run.get("validation_pairs") else None),
                 ("steps", run.get("steps")),
                 ("epochs", t.get("epochs")), ("batch size", t.get("batch_size")),
                 ("learning rate", t.get("learning_rate")), ("max length", t.get("max_length")),
                 ("loss on", t.get("loss_on")), ("precision", t.get("dtype")), ("packed", t.get("pack")),
                 ("seed", t.get("seed")),
                 ("training time", f"{run['seconds']:.0f} s" if run.get("seconds") is not None else None),
                 ("hardware", run.get("device"))]
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in facts if v is not None]
        metrics = [("final training loss", run.get("final_loss")), ("validation loss before", run.get("initial_val_loss")),
                   ("validation loss after", run.get("val_loss"))]
        if any(v is not None for _, v in metrics):
            lines += ["", "## Metrics", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in metrics if v is not None]
            if run.get("val_loss") is not None:
                lines += [f"| validation perplexity | {math.exp(min(run['val_loss'], 700.0)):.2f} |"]
        if cfg:
            lines += ["", "The run's configuration: `python -m jaxtune train --config config.yaml --output NEW_FOLDER` "
                      "repeats it (add `--data FILE` where its training pairs are not at `data`):", "",
                      "```yaml", yaml.safe_dump(portable_config(cfg), sort_keys=False).strip(), "```"]
        lines.append("")
    if evaluation:
        keys = [k for k in ("rouge_l", "exact_match", "stop_rate", "mean_tokens", "val_loss", "perplexity")
                if any(k in row for row in evaluation)]
        lines += ["## Evaluation", "", "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in evaluation:
            cells = [f"{row[k]:.4f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
            lines.append(f"| {row.get('model', '')} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Limitations", "",
              "A small GPT-2 model repeats the style of its training pairs and can state wrong facts confidently; "
              "check its answers before showing them to customers.", ""]
    return "\n".join(lines)


def _base_line(base) -> str:
    """The card's line that loads a LoRA adapter's base: a hub id or path as it is; the embedded model's copy that
    travels beside the adapter (`base`, a folder name) from the adapter's own folder, wherever Python runs."""
    if base == "base":
        return 'model = GPT2LMHeadModel.from_pretrained(f"{path}/base")  # the base, in base/ beside the adapter'
    return f'model = GPT2LMHeadModel.from_pretrained("{base}")  # the base'


def portable_config(cfg: dict) -> dict:
    """A run's configuration as it travels with its model (card, zip): without `output`, the folder on the machine
    that trained it, which a new run must not reuse (it says --output)."""
    return {k: v for k, v in cfg.items() if k != "output"}


def portable_config_text(directory) -> str | None:
    """A run folder's `config.yaml` as it travels with its model (zip, hub push), or None when it has none or it
    cannot be read."""
    try:
        cfg = yaml.safe_load((Path(directory) / "config.yaml").read_text(encoding="utf-8")) or {}
        return yaml.safe_dump(portable_config(cfg), sort_keys=False) if isinstance(cfg, dict) else None
    except (OSError, yaml.YAMLError):
        return None


def add_evaluation(readme: Path, rows: list[dict], *, data: str) -> bool:
    """Put an evaluation table (rows from `python -m jaxtune eval`) into a model card jaxtune wrote, replacing an
    earlier one; returns False (and changes nothing) for a README that is not a jaxtune card."""
    readme = Path(readme)
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return False
    if "tags:" not in text or "- jaxtune" not in text.split("---")[1 if text.startswith("---") else 0]:
        return False
    stub = model_card(_NoConfig(), evaluation=rows)
    section = stub[stub.index("## Evaluation"):stub.index("## Limitations")].rstrip() + "\n"
    section = section.replace("## Evaluation\n", f"## Evaluation\n\nGreedy answers to the held-out pairs in `{data}`, "
                              "scored against their references (`python -m jaxtune eval`):\n", 1)
    if "## Evaluation" in text:
        start = text.index("## Evaluation")
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    elif "## Limitations" in text:
        at = text.index("## Limitations")
        text = text[:at] + section + "\n" + text[at:]
    else:
        text = text.rstrip() + "\n\n" + section
    readme.write_text(text, encoding="utf-8")
    return True


class _NoConfig:  # model_card's architecture line, for a card built only for its evaluation section
    n_layer = n_embd = n_head = n_positions = 0


def tidy_tokenizer_config(directory: Path, n_positions: int) -> None:
    """tokenizer_config.json's model_max_length is the model's positions (tokenizers save a placeholder ~1e30)."""
    path = Path(directory) / "tokenizer_config.json"
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model_max_length"] = int(n_positions)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def own_base(directory) -> bool:
    """A LoRA adapter folder whose base is the copy beside it, base/ (a run on the embedded model, whose weights exist
    nowhere else): that base travels with the adapter."""
    try:
        cfg = json.loads((Path(directory) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and cfg.get("base_model_name_or_path") == "base"
            and (Path(directory) / "base" / "model.safetensors").exists())


def push(directory, repo_id: str, *, token: str | None, private: bool = True, commit_message: str | None = None,
         endpoint: str | None = None) -> str:
    """Upload a model or LoRA adapter folder to the hub in one commit, its model card included; its checkpoints,
    run files, merged/ and base/ (unless the adapter's base is that copy) left out. Returns the repository's URL.
    Errors come from the hub, as `huggingface_hub` raises them (`push_error` words them)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not _HUB_ID.match(repo_id or "") or "/" not in repo_id:
        raise ValueError(f"repository {repo_id!r}: give it as user/name or org/name")
    directory = Path(directory)
    adapter = (directory / "adapter_model.safetensors").exists()
    if not adapter and not (directory / "model.safetensors").exists():
        raise ValueError(f"{directory} holds no model.safetensors or adapter_model.safetensors: there is nothing to "
                         "push yet")
    skip = ("checkpoints/*", ".*", "*/.*", "data.jsonl", "train.log", "run.json", "config.yaml", "merged/*",
            *(() if adapter and own_base(directory) else ("base/*",)))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(f)) for f in sorted(directory.rglob("*"))
                  if f.is_file() and not any(fnmatch.fnmatch(name := f.relative_to(directory).as_posix(), p)
                                             for p in skip)]
    text = portable_config_text(directory)
    if text is not None:  # the run's config as its card shows it: no output folder
        operations.append(CommitOperationAdd(path_in_repo="config.yaml", path_or_fileobj=text.encode("utf-8")))
    api = HfApi(token=token, endpoint=endpoint)  # endpoint: None is the hub ($HF_ENDPOINT)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.create_commit(repo_id, operations=operations, commit_message=commit_message or
                      f"Upload a {'LoRA adapter' if adapter else 'model'} instruction-tuned with jaxtune")
    return str(url)


def push_error(error: Exception, repo_id: str) -> str:
    """Why an upload failed, by the hub's HTTP status (its own text can be long and technical)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    return {401: "the token was not accepted", 403: f"the token may not write to {repo_id}",
            404: f"{repo_id} was not found"}.get(status, f"the hub answered HTTP {status}" if status else
                                                "the upload did not complete")
