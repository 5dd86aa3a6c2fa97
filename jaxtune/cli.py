"""The command line: `python -m jaxtune train ...` and `python -m jaxtune generate ...`."""

from __future__ import annotations

import argparse
import errno
import logging
import re
import signal
import sys
from pathlib import Path

import jax
import yaml

from jaxtune.checkpoint import ModelLoadError, load

from jaxtune.config import LOSS_MODES, ConfigError, RunConfig, checked_int
from jaxtune.data import DataError, invalid_character
from jaxtune.generate import generate_ids, response_text
from jaxtune.launch import raise_interrupt
from jaxtune.rundir import MANIFEST, RunDirError
from jaxtune.sharding import enable_compilation_cache
from jaxtune.runs import execute
from jaxtune.tracking import TrackingError
from jaxtune.train import TrainingError

# flag -> (RunConfig field, or "train.<TrainConfig field>"); every flag's default is "not given", so a YAML file's
# values hold unless a flag names them
_FLAGS = {
    "model": "model", "data": "data", "split": "split", "output": "output", "validation_data": "validation_data",
    "validation_fraction": "validation_fraction", "instruction_column": "instruction_column",
    "response_column": "response_column", "eval_every": "eval_every", "early_stopping": "early_stopping", "samples": "samples", "strict": "strict",
    "allow_pickle": "allow_pickle", "save_every": "save_every", "keep_checkpoints": "keep_checkpoints",
    "distributed": "distributed",
    "epochs": "train.epochs", "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate", "max_length": "train.max_length", "loss_on": "train.loss_on",
    "seed": "train.seed", "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay",
    "grad_accum": "train.grad_accum", "max_steps": "train.max_steps", "dtype": "train.dtype", "fsdp": "train.fsdp",
    "no_dropout": "train.dropout", "pack": "train.pack", "report_to": "report_to", "merge": "merge",
    "lora_rank": "train.lora_rank", "lora_alpha": "train.lora_alpha", "lora_targets": "train.lora_targets",
    "lora_dropout": "train.lora_dropout", "remat": "train.remat",
    "quantize": "train.quantize",
}


def _train_parser(sub):
    p = sub.add_parser("train", help="instruction-tune a model on a file of pairs", argument_default=argparse.SUPPRESS,
                       description="Instruction-tune a GPT-2 model and write a Hugging Face directory. Options come "
                                   "from --config (YAML) and are overridden by flags.")
    p.add_argument("--config", help="YAML run configuration (a run directory's config.yaml repeats that run)")
    p.add_argument("--model", help="hub id (gpt2, distilgpt2, ...), local directory, 'tiny' (embedded offline "
                   "model) or 'auto' (gpt2 if it can be had, else tiny); default auto")
    p.add_argument("--data", help=".jsonl, .json, .csv, .tsv or .parquet with instruction and response columns, or a "
                   "Hugging Face data set (org/name or a local data-set folder) (required)")
    p.add_argument("--split", help="the data set's split (default train)")
    p.add_argument("--validation-data", help="held-out pairs; their loss is reported at the end (and every --eval-every)")
    p.add_argument("--validation-fraction", type=float, help="hold out this share of --data instead (seeded)")
    p.add_argument("--output", help="run directory: the tuned model (Hugging Face layout), metrics.jsonl, "
                   "samples.jsonl, config.yaml (required)")
    p.add_argument("--overwrite", action="store_true", help="replace the jaxtune run in --output (only the files "
                   "jaxtune wrote there are removed; a folder holding other files is never written into)")
    p.add_argument("--subfolder", action="store_true", help="put the run in a new run-YYYYMMDD-HHMMSS folder inside "
                   "--output (for a folder that holds other files)")
    p.add_argument("--resume", help="continue the stopped run in this directory (its checkpoints and config)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (a checkpoint is also saved on Ctrl-C)")
    p.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep (default 3)")
    p.add_argument("--instruction-column", help="column holding the instruction (default: instruction, prompt, question)")
    p.add_argument("--response-column", help="column holding the response (default: response, output, answer, completion)")
    p.add_argument("--strict", action="store_true", help="duplicates and rows longer than --max-length are errors")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--max-length", type=int, help="tokens per example, EOS included")
    p.add_argument("--loss-on", choices=LOSS_MODES,
                   help="response: response + EOS (default); all: every token + EOS; reference: the reference's loss")
    p.add_argument("--seed", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps")
    p.add_argument("--early-stopping", type=int, metavar="N",
                   help="stop once the validation loss has not fallen for N evaluations in a row, and keep the weights "
                        "of its lowest (needs held-out pairs; evaluates every --eval-every steps, default a tenth of "
                        "the run)")
    p.add_argument("--samples", type=int, help="held-out instructions to answer into samples.jsonl (default 4)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state over the devices "
                   "(with several devices the batch is always split over them)")
    p.add_argument("--no-dropout", action="store_false", help="train without dropout")
    p.add_argument("--pack", action="store_true", help="pack several examples into each row of --max-length tokens "
                   "(attention stays inside each example): almost no padding; --batch-size then counts rows")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pytorch_model.bin (a pickle: trusted files only)")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank, the base frozen (0, the default: "
                   "full fine-tuning); the run folder holds PEFT's adapter_config.json and adapter_model.safetensors")
    p.add_argument("--lora-alpha", type=float, help="adapter scale alpha / rank (default 2 x rank)")
    p.add_argument("--lora-targets", nargs="+", choices=("c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj"),
                   help="projections to adapt (default c_attn c_proj: attention's qkv and both output projections, "
                   "measured in benchmarks/lora_quality.py; c_proj means both; PEFT's GPT-2 default is c_attn)")
    p.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input while training (default 0)")
    p.add_argument("--quantize", choices=("none", "int8", "nf4"), help="QLoRA, with --lora-rank: hold the frozen "
                   "base's projections in 8 bits (int8, a scale per output) or 4 bits (nf4, a scale per 64 weights), "
                   "dequantized inside each product (default none)")
    p.add_argument("--remat", action="store_true", help="gradient checkpointing per block: keep only each block's "
                   "input and recompute the rest in the backward pass: less activation memory, for about a third more "
                   "compute a step")
    p.add_argument("--merge", action="store_true", help="with --lora-rank: also write the merged full model into "
                   "<output>/merged (Hugging Face layout)")
    p.add_argument("--report-to", nargs="+", choices=("none", "tensorboard", "trackio", "wandb"),
                   help="send metrics and the config to these trackers as steps finish (default none; each needs its "
                   "package: pip install tensorboard / trackio / wandb)")
    p.add_argument("--distributed", choices=("auto", "on", "off"),
                   help="several hosts (a TPU pod slice, SLURM, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/"
                   "JAX_PROCESS_ID): auto joins when the environment says so (default); run the same command on "
                   "every host, and process 0 writes the model")


def run_config(args) -> RunConfig:
    """Defaults, then the YAML file, then the flags that were given."""
    values: dict = {}
    if getattr(args, "resume", None):
        args.config = getattr(args, "config", None) or str(Path(args.resume) / "checkpoints" / "config.yaml")
        if not hasattr(args, "output"):
            args.output = args.resume
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists() and getattr(args, "resume", None) and path == Path(args.resume) / "checkpoints" / "config.yaml":
            resume = Path(args.resume)
            what = ("no such folder" if not resume.exists() else "a file, not a run's folder" if not resume.is_dir()
                    else "no jaxtune run there" if not (resume / MANIFEST).exists()
                    else "no checkpoint there to resume from (a run keeps checkpoints with --save-every, and on "
                         "Ctrl-C)")
            raise DataError(f"--resume {args.resume}: {what}; give the --output folder of a run that saved one")
        if not path.exists():
            raise DataError(f"--config {path}: no such file")
        try:
            with path.open(encoding="utf-8") as f:  # read from the file: YAML's errors name it
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise DataError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise DataError(f"--config {path}: expected a mapping of options")
    if not isinstance(values.get("train") or {}, dict):
        raise DataError(f"--config {args.config}: expected a mapping of options, with 'train' a mapping of training options")
    values = {**values, "train": dict(values.get("train") or {})}
    for flag, target in _FLAGS.items():
        if hasattr(args, flag):
            if target.startswith("train."):
                values["train"][target[6:]] = getattr(args, flag)
            else:
                values[target] = getattr(args, flag)
    cfg = RunConfig.from_dict(values, source=getattr(args, "config", None) or "options")
    for name in ("data", "output"):
        if not getattr(cfg, name):
            raise DataError(f"--{name} is required (or set '{name}' in the --config file)")
    return cfg


def _generate_parser(sub):
    p = sub.add_parser("generate", help="answer an instruction with a model",
                       description="Print a model's response to an instruction.")
    p.add_argument("--model", required=True, help="a tuned model directory (or LoRA adapter folder), a hub id, "
                   "'tiny' or 'auto'")
    p.add_argument("--base", help="for a LoRA adapter folder: the base model, instead of the one its config names")
    p.add_argument("--instruction", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-pickle", action="store_true")


def _eval_parser(sub):
    p = sub.add_parser("eval", help="score models' answers to held-out pairs, side by side",
                       description="For each model: validation loss and perplexity on the held-out pairs, then every "
                                   "held-out instruction answered (greedy, batched) and scored against its reference: "
                                   "ROUGE-L F1, exact match, stop rate, mean length in tokens. Writes eval.json, "
                                   "eval.jsonl and eval.md and prints a table.")
    p.add_argument("--model", required=True, help="the run (model directory), hub id, 'tiny' or 'auto' to evaluate")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL_OR_RUN",
                   help="more models or runs, evaluated on the same pairs (e.g. the base model)")
    p.add_argument("--data", help="held-out pairs (.jsonl, .json, .csv, .tsv, .parquet or a data set); default: "
                   "the pairs the --model run held out (its --validation-data, or its --validation-fraction split)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens (default 64)")
    p.add_argument("--output", help="folder for eval.json, eval.jsonl and eval.md (default: the --model folder)")
    p.add_argument("--batch-size", type=int, default=64, help="instructions answered together (default 64, fewer "
                   "when their key/value cache would pass 1 GiB)")
    p.add_argument("--instruction-column", help="column holding the instruction")
    p.add_argument("--response-column", help="column holding the reference response")
    p.add_argument("--base", help="the base model for the LoRA adapters among the models, when it is not where their "
                                  "adapter_config.json says (a folder that moved)")
    p.add_argument("--allow-pickle", action="store_true")


def _push_parser(sub):
    p = sub.add_parser("push", help="upload a run's model or LoRA adapter to the Hugging Face hub",
                       description="Upload a run folder's model, or its LoRA adapter (with the embedded base beside it "
                                   "when it has one), with its model card, tokenizer and config.yaml, to a hub "
                                   "repository in one commit; checkpoints and the run's own files stay behind. "
                                   "HF_ENDPOINT is honoured.")
    p.add_argument("run", help="the run folder (train's --output) or any model folder jaxtune wrote")
    p.add_argument("--repo", required=True, help="user/name or org/name; created when it does not exist")
    p.add_argument("--merged", action="store_true", help="for a LoRA run: the merged full model instead of the "
                   "adapter (the run's merged/ when --merge wrote it, else merged now)")
    p.add_argument("--public", action="store_true", help="make a new repository public (default: private)")
    p.add_argument("--token", help="a token with write access (default: $HF_TOKEN, or the one `hf auth login` saved)")


def _progress(total: int, show: bool = True):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr, disable=not show)

    def on_step(s):
        post = {"loss": f"{s.loss:.4f}", "tok/s": f"{s.tokens_per_sec:.0f}", "lr": f"{s.learning_rate:.2e}"}
        if s.val_loss is not None:
            post["val"] = f"{s.val_loss:.4f}"
            post["val_ppl"] = f"{s.val_perplexity:.1f}"
        bar.set_postfix(post, refresh=False)
        bar.update(s.step - bar.n)

    return bar, on_step


def cmd_train(args) -> int:
    resume = getattr(args, "resume", None)
    cfg = run_config(args)
    progress = {"bar": None, "on_step": None}
    stop = {"requested": False}

    def on_start(trainer):
        progress["bar"], progress["on_step"] = _progress(trainer.total_steps, show=jax.process_index() == 0)

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: abort
        if stop["requested"]:  # orbax's writer thread logs its interrupted save with a traceback: the user asked
            logging.getLogger("absl").setLevel(logging.CRITICAL)  # for it, and resume skips that checkpoint
            raise_interrupt(frame)
            return
        stop["requested"] = True
        print("\nstopping after this step and saving what was learned (Ctrl-C again to abort)", file=sys.stderr)

    def log(line):  # on lines of their own while the progress bar is drawn
        if progress["bar"] is not None:
            progress["bar"].write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        outcome = execute(cfg, resume=Path(resume) if resume else None, overwrite=getattr(args, "overwrite", False),
                          subfolder=getattr(args, "subfolder", False), on_start=on_start, log=log,
                          on_step=lambda s: progress["on_step"](s), should_stop=lambda: stop["requested"])
    finally:
        if progress["bar"] is not None:
            progress["bar"].close()
        signal.signal(signal.SIGINT, previous)
    if outcome.summary:
        print(outcome.summary, file=sys.stderr if outcome.code == 3 else sys.stdout)
    if stop["requested"] and outcome.code == 0:
        return 130  # stopped by Ctrl-C: saved, but not the whole run (`train && deploy` must not go on)
    return outcome.code


def cmd_generate(args) -> int:
    from jaxtune.data import format_prompt, tokenize_text
    from jaxtune.generate import _checked_instructions, _sampling

    # the settings are checked before the model loads; an answer of no tokens prints nothing, as eval refuses it
    checked_int("max_new_tokens", args.max_new_tokens, 1, 2**20)
    _checked_instructions(args.instruction)
    _sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model, tokenizer = load(args.model, allow_pickle=args.allow_pickle, base=args.base)
    ids = generate_ids(model, tokenizer, format_prompt(args.instruction), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(response_text(tokenizer, ids))
    prompt = len(tokenize_text(tokenizer, [format_prompt(args.instruction)])[0].ids)
    room = model.config.n_positions - prompt
    if room < args.max_new_tokens and tokenizer.eos_token_id not in ids:  # cut at the model's last position
        print(f"note: the model reads {model.config.n_positions} positions and the prompt took {prompt}, so the answer "
              f"had room for {room} of the {args.max_new_tokens} new tokens asked", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from jaxtune.evaluate import run, table

    results, written = run([args.model, *args.compare], args.data, max_new_tokens=args.max_new_tokens,
                           output=args.output, batch_size=args.batch_size, allow_pickle=args.allow_pickle,
                           instruction_column=args.instruction_column, response_column=args.response_column,
                           base=args.base)
    print(table(results))
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def cmd_push(args) -> int:
    import os
    import tempfile

    from huggingface_hub import get_token

    from jaxtune.card import push, push_error
    from jaxtune.lora import is_adapter_dir

    token = args.token or get_token()
    if not token:
        raise DataError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token (it needs write "
                        "access)")
    folder = Path(args.run)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give the run's --output folder")
    adapter = is_adapter_dir(folder)
    if not adapter and not (folder / "model.safetensors").exists():
        raise DataError(f"{folder} holds no model yet (no model.safetensors or adapter_model.safetensors): a run "
                        "writes its model when it ends or is stopped")
    if args.merged and not adapter:
        raise DataError(f"--merged is for a LoRA run, and {folder} holds a full model: leave --merged out")
    what = "merged model" if args.merged else "LoRA adapter" if adapter else "model"
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None  # a mirror, or the hub itself
    with tempfile.TemporaryDirectory(prefix="jaxtune-push-") as scratch:
        source = _merged(folder, Path(scratch) / "merged") if args.merged else folder
        try:
            url = push(source, args.repo, token=token, private=not args.public, endpoint=endpoint, run_dir=folder,
                       commit_message=f"Upload a {what} tuned with jaxtune")
        except ValueError:  # a repository name or folder push refuses, said as it is
            raise
        except Exception as e:  # noqa: BLE001 - the hub's errors, said by their HTTP status
            reason = push_error(e, args.repo)
            if reason == "the upload did not complete":
                reason += f" ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no answer'})"
            raise DataError(f"upload to {args.repo} failed: {reason}. Check the token (it needs write access), the "
                            "repository name and the network") from None
    print(f"uploaded the {what} in {folder} to {url}")
    return 0


def _merged(folder: Path, scratch: Path) -> Path:
    """A LoRA run's merged model: its merged/ when --merge wrote it from this adapter, else merged now into scratch,
    with a card from the run's config.yaml and metrics.jsonl."""
    import json

    from jaxtune.checkpoint import save
    from jaxtune.lora import merge, merged_beside

    if (own := merged_beside(folder)) is not None:
        return own
    model, tokenizer = load(str(folder))
    try:
        cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError, yaml.YAMLError):
        cfg, steps = {}, []
    cfg = cfg if isinstance(cfg, dict) else {}
    vals = [s["val_loss"] for s in steps if s.get("val_loss") is not None]
    info = {"base_model": cfg.get("model"), "config": cfg,
            "steps": steps[-1]["step"] if steps else None, "final_loss": steps[-1]["loss"] if steps else None,
            "val_loss": vals[-1] if vals else None}
    save(merge(model), tokenizer, scratch, run_info=info)
    print(f"merged the adapter in {folder} into its base", file=sys.stderr)
    return scratch


def _as_typed(message: str, argv: list[str]) -> str:
    """A message about an option names it as the user typed it: 'learning_rate=0.0 must be ...' becomes
    '--learning-rate 0.0 must be ...' when the flag was given (a value from a --config file keeps its key)."""
    m = re.match(r"(\w+)=(\S+) ", message)
    flag = m and "--" + m[1].replace("_", "-")
    if flag and any(a == flag or a.startswith(flag + "=") for a in argv):
        return f"{flag} {m[2]} {message[m.end():]}"
    return message


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune", description="Instruction-tune GPT-2 models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    _eval_parser(sub)
    _push_parser(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:  # bytes that are not UTF-8 reach Python as lone surrogates: no tokenizer or file name takes them
        if invalid_character(arg) is not None:
            try:
                shown = str(arg.encode("utf-8", "surrogateescape"))[2:-1]  # the bytes as typed: 'bad \xff byte'
            except UnicodeEncodeError:
                shown = arg.encode("utf-8", "backslashreplace").decode()
            print(f"error: the argument '{shown}' holds bytes that are not valid UTF-8; retype it (or set the "
                  "terminal's encoding to UTF-8)", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: raise_interrupt(frame))  # see raise_interrupt
    enable_compilation_cache()  # a second launch on the same shapes skips compiling (JAXTUNE_COMPILATION_CACHE=0: off)
    try:
        return {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "push": cmd_push}[args.command](args)
    except (DataError, ModelLoadError, ConfigError, TrainingError, RunDirError, TrackingError, ValueError) as e:
        print(f"error: {_as_typed(str(e), argv)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # train's second Ctrl-C (its first stops and saves), or generate's, eval's, push's
        print("\naborted (a second Ctrl-C): nothing more was saved" if args.command == "train" else
              "\naborted by Ctrl-C", file=sys.stderr)
        return 130
    except OSError as e:  # a folder that cannot be written (read-only, a file in the path, no permission, no space)
        hint = {errno.EROFS: "choose a folder on a writable disk", errno.EACCES: "choose a folder you may write to",
                errno.EPERM: "choose a folder you may write to", errno.ENOTDIR: "part of that path is a file, not a folder",
                errno.ENOSPC: "free some space or choose another disk"}.get(e.errno)
        print(f"error: {e}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 2
    except MemoryError as e:
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}); lower --batch-size or --max-length (use "
              "--grad-accum for the same effective batch) or pick a smaller model", file=sys.stderr)
        return 2
    except Exception as e:  # XLA reports device memory running out as a runtime error
        if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise
        print(f"error: the device ran out of memory ({str(e).splitlines()[0][:200]}); lower --batch-size or "
              "--max-length (use --grad-accum for the same effective batch), use --fsdp over several devices, or "
              "pick a smaller model", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)
