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


ROLES = ("model", "base", "merged")  # a run's own model or adapter; a LoRA run's base/ and merged/ folders


def model_card(config, *, run: dict | None = None, evaluation: list[dict] | None = None, repo_id: str | None = None,
               adapter: dict | None = None, role: str | None = None) -> str:
    """README.md text. `run` (optional) describes the training: base_model, config (a RunConfig dict), pairs,
    validation_pairs, steps, total_steps, stopped (why it ended early, or None), resumes ([{step, changes}]), seconds,
    device, final_loss, val_loss (of the weights written), initial_val_loss, best_step (early stopping: the step whose
    weights were kept), tokens_per_s, source. `evaluation` rows come from
    `python -m jaxtune eval` (model, rouge_l, exact_match, stop_rate, ...). `role` says what the folder holds: "model"
    (the run's model or adapter), "base" (a LoRA run's base/: the frozen base its adapter trained on) or "merged" (a
    LoRA run's merged/: the adapter merged into its base); a full model from a LoRA run is "merged" unless told."""
    run = run or {}
    cfg = run.get("config") or {}
    t = cfg.get("train") or {}
    if role is None:
        role = "merged" if t.get("lora_rank") and not adapter else "model"
    if role not in ROLES:
        raise ValueError(f"role={role!r}: choose one of {', '.join(ROLES)}")
    if adapter:  # the base a PEFT adapter names, if it is a hub model
        run = {**run, "base_model": run.get("base_model") or adapter.get("base_model_name_or_path")}
    base = hub_id(run.get("base_model")) if role != "base" else None
    data = hub_id(cfg.get("data"))
    quant = t.get("quantize") if t.get("quantize") not in (None, "none") else None
    lora = "QLoRA" if quant else "LoRA"
    meta = {"library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation",
            "tags": ["jaxtune", "gpt2", *(() if role == "base" else ("instruction-tuned",)), "jax", "flax",
                     *(("lora",) if adapter or role == "merged" else ())]}
    if base:
        meta["base_model"] = base
        if base in _KNOWN_LICENSES:
            meta["license"] = _KNOWN_LICENSES[base]
    if data and role != "base":
        meta["datasets"] = [data]
    name = repo_id or "this model"
    title = {"base": "Base model of a LoRA run with jaxtune", "merged": "GPT-2 LoRA-tuned with jaxtune, merged"}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else title.get(role, 'GPT-2 instruction-tuned with jaxtune')}", ""]
    arch = (f"({config.n_layer} layers, {config.n_embd} wide, {config.n_head} heads, {config.n_positions} "
            "positions)")
    of = f"[{base}](https://huggingface.co/{base})" if base else run.get("source") or run.get("base_model")
    if adapter:
        shape = _lora_shape(adapter.get("r"), adapter.get("lora_alpha"), adapter.get("target_modules"))
        what = (f"a QLoRA adapter{shape} trained on an {quant}-quantized {of}" if quant else
                f"a LoRA adapter{shape} for {of or 'a GPT-2 model'}")
    elif role == "merged":
        rank = t.get("lora_rank")
        alpha = t.get("lora_alpha") or (2 * rank if rank else None)  # as its adapter_config.json says it
        shape = _lora_shape(rank, alpha and float(alpha), t.get("lora_targets"))
        what = f"a jaxtune run's {lora} adapter{shape} merged into its base" + (f", {of}" if of else "")
    else:
        what = f"a fine-tune of {of}" if of else "a GPT-2 model"
    if role == "base":
        embedded = run.get("base_model") in ("tiny", "auto") or "random weights" in str(run.get("source") or "")
        lines += [f"{name[0].upper() + name[1:]} is the frozen base model the {lora} adapter in the parent folder was "
                  "trained on: " + ("the embedded tiny model, GPT-2's architecture and vocabulary with random weights, "
                                    "untrained" if embedded else str(of or "a GPT-2 model")) + f" {arch}. "
                  + (f"During training it was held in {quant}; these are its dequantized float32 weights, the values "
                     "the adapter was trained against. " if quant else "")
                  + "It loads in PyTorch `transformers` as it is; the adapter and how it was trained are described in "
                  "the parent folder's README.md.", ""]
    else:
        lines += [f"{name[0].upper() + name[1:]} is {what}, instruction-tuned with jaxtune in JAX {arch}. "
                  + ("It loads in PyTorch with PEFT." if adapter else "It is a full model: it loads in PyTorch "
                     "`transformers` alone, without PEFT." if role == "merged" else
                     "It loads in PyTorch `transformers` as it is.")
                  + (f" The adapter was trained on the base quantized to {quant}; it is merged into that base's "
                     "dequantized float32 weights, as the run computed." if quant and role == "merged" else ""), "",
                  "## Prompt format", "",
                  "The model was trained on `Instruction: {instruction}\\nResponse: {response}` followed by the "
                  "end-of-text token, so give it the instruction and let it complete the response: it was taught "
                  "to end the response with that token, where generation stops.", "",
                  "```", "Instruction: Where is my order?", "Response:", "```", ""]
    lines += ["## Use it", "", "```python",
              "from transformers import AutoTokenizer, GPT2LMHeadModel", "",
              f'path = "{repo_id or _PLACEHOLDER}"',
              "tokenizer = AutoTokenizer.from_pretrained(path)",
              *([_base_line(adapter.get("base_model_name_or_path")),
                 "from peft import PeftModel",
                 "model = PeftModel.from_pretrained(model, path)  # the LoRA adapter on top"] if adapter else
                ["model = GPT2LMHeadModel.from_pretrained(path)"]),
              'inputs = tokenizer("Instruction: Where is my order?\\nResponse:", return_tensors="pt")',
              "out = model.generate(**inputs, max_new_tokens=64, pad_token_id=tokenizer.eos_token_id)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", ""]
    if adapter and quant:
        exact = ("base/ holds the base dequantized from " + quant + ", so the lines above compute what the run "
                 "computed" if adapter.get("base_model_name_or_path") == "base" else
                 "loading the adapter on the float base, as above, gives slightly different outputs")
        lines += [f"The adapter was trained on the base quantized to {quant} (QLoRA). "
                  + ("merged/, in the run's folder, is" if cfg.get("merge") else
                     "A merged model (a run with `merge: true` writes it to merged/) is")
                  + f" what the run computed: the adapter merged into the dequantized base; {exact}.", ""]
    if run and role != "base":
        facts = [("base model", run.get("source") or run.get("base_model")),
                 ("training data", f"{run['pairs']:,} pairs" + (f" from `{cfg['data']}`" if data else "") if run.get("pairs") else None),
                 ("validation data", f"{run['validation_pairs']:,} pairs" if run.get("validation_pairs") else None),
                 ("steps", _steps(run)), ("resumed", _resumes(run)),
                 ("early stopping", f"after {cfg['early_stopping']} evaluation{'s' if cfg['early_stopping'] != 1 else ''}"
                  " without a lower validation loss"
                  + (f"; the weights are step {run['best_step']}'s" if run.get("best_step") is not None else "")
                  if cfg.get("early_stopping") else None),
                 ("epochs", f"{t.get('epochs')}, cut short: max steps {t['max_steps']} ends the run"
                  if run.get("cut_by_max_steps") else t.get("epochs")),
                 ("batch size", t.get("batch_size")),
                 ("learning rate", t.get("learning_rate")), ("max length", t.get("max_length")),
                 ("loss on", t.get("loss_on")), ("precision", t.get("dtype")), ("base quantization", quant),
                 ("packed", t.get("pack")), ("seed", t.get("seed")),
                 ("training time", f"{run['seconds']:.0f} s" if run.get("seconds") is not None else None),
                 ("hardware", run.get("device"))]
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in facts if v is not None]
        best = run.get("best_step")
        kept = (f"validation loss of the weights kept (step {best}, the lowest)" if best is not None
                and best != run.get("steps") else "validation loss after")  # early stopping kept an earlier step's
        metrics = [("final training loss", run.get("final_loss")), ("validation loss before", run.get("initial_val_loss")),
                   (kept, run.get("val_loss"))]
        if any(v is not None for _, v in metrics):
            lines += ["", "## Metrics", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in metrics if v is not None]
            if run.get("val_loss") is not None:
                lines += [f"| validation perplexity | {math.exp(min(run['val_loss'], 700.0)):.2f} |"]
        if cfg:
            command = "`python -m jaxtune train --config config.yaml --output NEW_FOLDER`"
            changed = [r for r in run.get("resumes") or [] if r.get("changes")]
            where = "add `--data FILE` where its training pairs are not at `data`" + (
                ", and `--validation-data FILE` where its held-out pairs are not at `validation_data`"
                if cfg.get("validation_data") else "")
            if changed:
                lines += ["", "The run was resumed " + "; ".join(f"at step {r['step']} with {', '.join(r['changes'])}"
                                                             for r in changed)
                          + f", so its configuration below holds the final values: {command} repeats the run only "
                          f"approximately (its steps before the resume used the earlier values; {where}):"]
            else:
                lines += ["", f"The run's configuration: {command} repeats it ({where}):"]
            lines += ["", "```yaml", yaml.safe_dump(portable_config(cfg), sort_keys=False).strip(), "```"]
        lines.append("")
    if evaluation:
        lines += _evaluation_lines(evaluation)
    lines += ["## Limitations", "",
              "Random weights: this model writes noise; it is here for the adapter in the parent folder to load on."
              if role == "base" and embedded else
              "A small GPT-2 model repeats the style of its training pairs and can state wrong facts confidently; "
              "check its answers before showing them to customers.", ""]
    return "\n".join(lines)


_PLACEHOLDER = "path/to/this/folder"  # the card's `path = ...` line for a local folder; `push` puts the repo id there


def _lora_shape(rank, alpha, targets) -> str:
    """ " (rank 8, alpha 16, on c_attn, c_proj)", of what is known; "" when nothing is."""
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    parts = [part for part in (rank and f"rank {rank}", alpha and f"alpha {alpha}",
                               targets and f"on {', '.join(targets)}") if part]
    return f" ({', '.join(parts)})" if parts else ""


def _steps(run: dict):
    """The steps row: "24", or "24 of 40 (stopped early: why)" for a run that ended before its plan."""
    steps, total = run.get("steps"), run.get("total_steps")
    if steps is None or not total or steps == total:
        return steps if not run.get("stopped") else f"{steps} (stopped early: {run['stopped']})"
    return f"{steps:,} of {total:,}" + (f" (stopped early: {run['stopped']})" if run.get("stopped") else "")


def _resumes(run: dict) -> str | None:
    """The resumed row: each resume's step and the options it changed."""
    resumes = run.get("resumes") or []
    return "; ".join(f"at step {r.get('step')}" + (f" ({', '.join(r['changes'])})" if r.get("changes") else "")
                     for r in resumes) or None


def _evaluation_lines(rows: list[dict], data: str | None = None, max_new_tokens: int | None = None) -> list[str]:
    """The card's evaluation section: eval.md's summary table (its columns, headers and figures) and its warnings."""
    from jaxtune.evaluate import data_words, held_out_words, summary_markdown, warning_lines

    lines = ["## Evaluation", ""]
    if data:
        most = f" of at most {max_new_tokens} new tokens" if max_new_tokens else ""
        lines += [f"Greedy answers{most} to the {held_out_words(rows)} in {data_words(data)}, scored against their "
                  "references (`python -m jaxtune eval`):", ""]
    return lines + summary_markdown(rows) + warning_lines(rows) + [""]


def _base_line(base) -> str:
    """The card's line that loads a LoRA adapter's base: a hub id or path as it is; the embedded model's copy that
    travels beside the adapter (`base`, a folder name) from the adapter's own folder, wherever Python runs."""
    if base == "base":  # subfolder: a local folder or a hub repository alike
        return 'model = GPT2LMHeadModel.from_pretrained(path, subfolder="base")  # the base, in base/ beside the adapter'
    return f'model = GPT2LMHeadModel.from_pretrained("{base}")  # the base'


def portable_config(cfg: dict) -> dict:
    """A run's configuration as it travels with its model (card, zip, hub): without `output`, the folder on the
    machine that trained it, which a new run must not reuse (it says --output), and with local data files by their
    names (the card says to pass --data where they are not), not by paths that name the trainer's folders."""
    out = {k: v for k, v in cfg.items() if k != "output"}
    for key in ("data", "validation_data"):
        if isinstance(out.get(key), str) and Path(out[key]).is_absolute():
            out[key] = Path(out[key]).name
    return out


def portable_config_text(directory) -> str | None:
    """A run folder's `config.yaml` as it travels with its model (zip, hub push), or None when it has none or it
    cannot be read."""
    try:
        cfg = yaml.safe_load((Path(directory) / "config.yaml").read_text(encoding="utf-8")) or {}
        return yaml.safe_dump(portable_config(cfg), sort_keys=False) if isinstance(cfg, dict) else None
    except (OSError, yaml.YAMLError):
        return None


def add_evaluation(readme: Path, rows: list[dict], *, data: str, max_new_tokens: int | None = None) -> bool:
    """Put an evaluation table (rows from `python -m jaxtune eval`) into a model card jaxtune wrote, replacing an
    earlier one; returns False (and changes nothing) for a README that is not a jaxtune card."""
    readme = Path(readme)
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return False
    if "tags:" not in text or "- jaxtune" not in text.split("---")[1 if text.startswith("---") else 0]:
        return False
    section = "\n".join(_evaluation_lines(rows, data, max_new_tokens)).rstrip() + "\n"
    if "## Evaluation" in text:
        start = text.index("## Evaluation")
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end + 1:] if end != -1 else "")
    elif "## Limitations" in text:
        at = text.index("## Limitations")
        text = text[:at] + section + "\n" + text[at:]
    else:
        text = text.rstrip() + "\n\n" + section
    readme.write_text(text, encoding="utf-8")
    return True


def tidy_tokenizer_config(directory: Path, n_positions: int) -> None:
    """tokenizer_config.json's model_max_length is the model's positions (tokenizers save a placeholder ~1e30)."""
    path = Path(directory) / "tokenizer_config.json"
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model_max_length"] = int(n_positions)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _adapter_base(directory) -> str | None:
    """The base a LoRA adapter folder names (adapter_config.json's base_model_name_or_path), or None."""
    try:
        named = json.loads((Path(directory) / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return named if isinstance(named, str) and named else None


def own_base(directory, named: str | None = None) -> bool:
    """A LoRA adapter folder whose base is the copy beside it, base/ (a run on the embedded model, whose weights exist
    nowhere else): that base travels with the adapter. `named`: the base its adapter_config.json names, when the
    caller has read it already."""
    named = _adapter_base(directory) if named is None else named
    return named == "base" and (Path(directory) / "base" / "model.safetensors").exists()


def push(directory, repo_id: str, *, token: str | None, private: bool = True, commit_message: str | None = None,
         endpoint: str | None = None, run_dir=None) -> str:
    """Upload a model or LoRA adapter folder to the hub in one commit, its model card and the run's config.yaml
    (from `run_dir`, the run's folder, when the model is not in it: a merged model) included; its checkpoints, run
    files, samples, merged/ and base/ (unless the adapter's base is that copy) left out. An adapter whose base is a
    folder on this machine is refused: nobody who downloads it has that base. Returns the repository's URL. Errors
    come from the hub, as `huggingface_hub` raises them (`push_error` words them)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if not _HUB_ID.match(repo_id or "") or "/" not in repo_id:
        raise ValueError(f"repository {repo_id!r}: give it as user/name or org/name")
    directory = Path(directory)
    adapter = (directory / "adapter_model.safetensors").exists()
    if not adapter and not (directory / "model.safetensors").exists():
        raise ValueError(f"{directory} holds no model.safetensors or adapter_model.safetensors: there is nothing to "
                         "push yet")
    named = _adapter_base(directory) if adapter else None
    with_base = adapter and own_base(directory, named)
    if adapter and not with_base and not hub_id(named):
        raise ValueError(f"the adapter in {directory} was trained on {named or 'a base it does not name'}, which is "
                         "not on the hub: nobody who downloads the adapter could load it. Push the merged model "
                         "instead (a full model: --merged, or the app's merged export)")
    skip = ("checkpoints/*", ".*", "*/.*", "data.jsonl", "samples.jsonl", "train.log", "run.json", "config.yaml",
            "merged/*",
            *(() if with_base else ("base/*",)))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(f)) for f in sorted(directory.rglob("*"))
                  if f.is_file() and (name := f.relative_to(directory).as_posix()) != "README.md"
                  and not any(fnmatch.fnmatch(name, p) for p in skip)]
    if (directory / "README.md").is_file():  # the card's code loads from the repository, not a local folder
        card = (directory / "README.md").read_text(encoding="utf-8")
        card = card.replace(f'path = "{_PLACEHOLDER}"', f'path = "{repo_id}"', 1)
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
    text = portable_config_text(directory if (directory / "config.yaml").is_file() or run_dir is None else run_dir)
    if text is not None:  # the run's config as its card shows it: no output folder
        operations.append(CommitOperationAdd(path_in_repo="config.yaml", path_or_fileobj=text.encode("utf-8")))
    metrics = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
    if not (directory / "metrics.jsonl").is_file() and metrics is not None and metrics.is_file():  # a merged model's
        operations.append(CommitOperationAdd(path_in_repo="metrics.jsonl", path_or_fileobj=str(metrics)))
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
