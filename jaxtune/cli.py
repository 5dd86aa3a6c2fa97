"""The command line: `python -m jaxtune train ...` and `python -m jaxtune generate ...`."""

from __future__ import annotations

import argparse
import math
import json
import shutil
import signal
import sys
from pathlib import Path

from jaxtune.checkpoint import ModelLoadError, load, save
import jax
import numpy as np
import yaml

from jaxtune.config import LOSS_MODES, ConfigError, RunConfig
from jaxtune.data import DataError, EncodedSet, inspect_rows, read_pairs
from jaxtune.generate import generate
from jaxtune.rundir import (RunDirError, claim, data_fingerprint, prepare_output, remove_owned, resume_conflicts,
                            verify_checksums)
from jaxtune.sharding import initialize_distributed
from jaxtune.train import Trainer, TrainingError

# flag -> (RunConfig field, or "train.<TrainConfig field>"); every flag's default is "not given", so a YAML file's
# values hold unless a flag names them
_FLAGS = {
    "model": "model", "data": "data", "split": "split", "output": "output", "validation_data": "validation_data",
    "validation_fraction": "validation_fraction", "instruction_column": "instruction_column",
    "response_column": "response_column", "eval_every": "eval_every", "samples": "samples", "strict": "strict",
    "allow_pickle": "allow_pickle", "save_every": "save_every", "keep_checkpoints": "keep_checkpoints",
    "distributed": "distributed",
    "epochs": "train.epochs", "batch_size": "train.batch_size",
    "learning_rate": "train.learning_rate", "max_length": "train.max_length", "loss_on": "train.loss_on",
    "seed": "train.seed", "warmup_steps": "train.warmup_steps", "weight_decay": "train.weight_decay",
    "grad_accum": "train.grad_accum", "max_steps": "train.max_steps", "dtype": "train.dtype", "fsdp": "train.fsdp",
    "no_dropout": "train.dropout", "pack": "train.pack",
}


def _train_parser(sub):
    p = sub.add_parser("train", help="instruction-tune a model on a file of pairs", argument_default=argparse.SUPPRESS,
                       description="Instruction-tune a GPT-2 model and write a Hugging Face directory. Options come "
                                   "from --config (YAML) and are overridden by flags.")
    p.add_argument("--config", help="YAML run configuration (a run directory's config.yaml repeats that run)")
    p.add_argument("--model", help="hub id (gpt2, distilgpt2, ...), local directory, 'tiny' (embedded offline "
                   "model) or 'auto' (gpt2 if it can be had, else tiny); default auto")
    p.add_argument("--data", help=".jsonl, .json, .csv or .parquet with instruction and response columns, or a "
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
    p.add_argument("--samples", type=int, help="held-out instructions to answer into samples.jsonl (default 4)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state over the devices "
                   "(with several devices the batch is always split over them)")
    p.add_argument("--no-dropout", action="store_false", help="train without dropout")
    p.add_argument("--pack", action="store_true", help="pack several examples into each row of --max-length tokens "
                   "(attention stays inside each example): almost no padding; --batch-size then counts rows")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pytorch_model.bin (a pickle: trusted files only)")
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
        if not path.exists():
            raise DataError(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise DataError(f"--config {path}: expected a mapping of options")
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
    p.add_argument("--model", required=True, help="a tuned model directory, a hub id, 'tiny' or 'auto'")
    p.add_argument("--instruction", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-pickle", action="store_true")


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


def _split(pairs, fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = max(1, int(round(len(pairs) * fraction)))
    if n_val >= len(pairs):
        raise DataError(f"validation_fraction={fraction} leaves no training pairs out of {len(pairs)}")
    return [pairs[i] for i in sorted(order[n_val:])], [pairs[i] for i in sorted(order[:n_val])]


def _check(pairs, tokenizer, cfg: RunConfig, what: str):
    report = inspect_rows(pairs, tokenizer, max_length=cfg.train.max_length, loss_on=cfg.train.loss_on)
    for line in report.warnings[:10]:
        print(f"warning: {line}", file=sys.stderr)
    if len(report.warnings) > 10:
        print(f"warning: ... and {len(report.warnings) - 10} more", file=sys.stderr)
    if cfg.strict and report.warnings:
        raise DataError(f"{what}: {len(report.warnings)} warning(s) and --strict is set; first: {report.warnings[0]}")
    return report


def _resume_config(resume: Path) -> dict:
    path = resume / "checkpoints" / "config.yaml"
    if not path.exists():
        raise DataError(f"--resume {resume}: no checkpoints/config.yaml there; give the --output folder of a run "
                        "that saved a checkpoint (--save-every, or Ctrl-C)")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _check_resume_options(resume: Path, saved: dict, cfg: RunConfig) -> None:
    """Refuse, before anything is loaded, a resume whose options would not continue the stopped run."""
    conflicts = resume_conflicts(saved, cfg.to_dict())
    if conflicts:
        raise DataError(f"--resume {resume}: these options differ from the stopped run's, which would change the "
                        f"shapes, the data or its order: {'; '.join(conflicts)}. Leave them out (the run's "
                        "checkpoints/config.yaml holds them) or start a new run")


def _check_resume(resume: Path, saved: dict, cfg: RunConfig, fingerprint: dict, trainer) -> None:
    """Refuse a resume whose data or step count would not continue the stopped run (after its checkpoint is read)."""
    extra = getattr(trainer, "checkpoint_extra", {})
    for key, what in (("data_sha256", "training data"), ("validation_sha256", "validation data")):
        if key in extra and extra[key] != fingerprint.get(key):
            raise DataError(f"--resume {resume}: the {what} differ from the stopped run's (content hash "
                            f"{str(extra[key])[:12]}... then, {str(fingerprint.get(key))[:12]}... now). Resume with the "
                            "data it was trained on, or start a new run")
    if "data_sha256" not in extra and saved.get("data") != cfg.data:
        raise DataError(f"--resume {resume}: --data {cfg.data} is not the file the run was trained on ({saved.get('data')}) "
                        "and its checkpoint holds no content hash to compare")
    if trainer.total_steps < trainer.step:
        raise DataError(f"--resume {resume}: the checkpoint is at step {trainer.step}, past the {trainer.total_steps} "
                        "steps these options plan; epochs and --max-steps may grow, not shrink")


def cmd_train(args) -> int:
    resume = Path(args.resume) if getattr(args, "resume", None) else None
    saved = _resume_config(resume) if resume else None
    cfg = run_config(args)
    hosts = initialize_distributed(cfg.distributed)  # before anything touches a device
    lead = jax.process_index() == 0  # on several hosts, process 0 alone prints progress and writes files
    if hosts:
        print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
              f"{jax.device_count()} devices", file=sys.stderr)
    overwrite = getattr(args, "overwrite", False)
    # checked before anything is read or trained; nothing is removed until training starts
    out = prepare_output(Path(cfg.output), overwrite=overwrite, resume=resume, subfolder=getattr(args, "subfolder", False))
    if resume:  # before the model is loaded: a model of another shape is named here, not by orbax
        _check_resume_options(resume, saved, cfg)
    tcfg = cfg.train
    cols = dict(instruction_column=cfg.instruction_column, response_column=cfg.response_column)
    pairs = read_pairs(cfg.data, split=cfg.split, **cols)  # data errors surface before the model is loaded or compiled
    val_pairs = read_pairs(cfg.validation_data, **cols) if cfg.validation_data else None
    fingerprint = {"data_sha256": data_fingerprint(pairs)}
    if val_pairs:
        fingerprint["validation_sha256"] = data_fingerprint(val_pairs)
    if val_pairs is None and cfg.validation_fraction:
        pairs, val_pairs = _split(pairs, cfg.validation_fraction, tcfg.seed)
    model, tokenizer = load(cfg.model, allow_pickle=cfg.allow_pickle, seed=tcfg.seed)
    print(f"model: {getattr(model, 'source', cfg.model)}", file=sys.stderr)
    tcfg.max_length = min(tcfg.max_length, model.config.n_positions)
    report = _check(pairs, tokenizer, cfg, "training data")
    if val_pairs:
        _check(val_pairs, tokenizer, cfg, "validation data")
    encoded = EncodedSet(report.encoded, report.pairs, report.truncated, report.dropped, tcfg.max_length)
    if not report.pairs:
        raise DataError(f"{cfg.data}: no row keeps any of its response within max_length {tcfg.max_length} tokens; "
                        "raise --max-length or shorten the instructions")
    trainer = Trainer(model, tokenizer, encoded, tcfg, validation_pairs=val_pairs)
    print(f"data: {len(report.pairs)} pairs, {report.tokens:,} tokens ({trainer.truncated} truncated at {tcfg.max_length} "
          f"tokens{f', {len(report.dropped)} left out' if report.dropped else ''}, {len(report.warnings)} warning(s))"
          f"{f', {len(val_pairs)} validation pairs' if val_pairs else ''}; "
          f"{trainer.total_steps} steps; real tokens fill {trainer.planned_real_token_share:.0%} of the computed "
          f"positions{' (packed)' if tcfg.pack else ''}", file=sys.stderr)

    checkpoints = out / "checkpoints"
    if resume:
        history = trainer.restore_checkpoint(resume / "checkpoints", warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        _check_resume(resume, saved, cfg, fingerprint, trainer)
        print(f"resuming {resume} at step {trainer.step}/{trainer.total_steps}", file=sys.stderr)
    else:
        history = []
    if overwrite and lead and out.exists() and not (resume and out.resolve() == resume.resolve()):
        removed = remove_owned(out)  # the run being replaced: only what jaxtune wrote there
        if removed:
            print(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}", file=sys.stderr)

    def checkpoint(steps):  # every host takes part: orbax writes each host's shards
        if lead:
            claim(out, ["checkpoints"])
            checkpoints.mkdir(parents=True, exist_ok=True)
            (checkpoints / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trainer.save_checkpoint(checkpoints, keep=cfg.keep_checkpoints, history=history + steps, extra=fingerprint)

    def periodic_checkpoint(steps):  # a checkpoint that cannot be written does not end the run
        try:
            checkpoint(steps)
            return True
        except OSError as e:
            _drop_partial(checkpoints, trainer.step)
            print(f"\nwarning: the checkpoint of step {trainer.step} could not be written ({e.strerror or e}); "
                  "training goes on", file=sys.stderr)
            return False

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: abort
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after this step and saving what was learned (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar, on_step = _progress(trainer.total_steps, show=lead)
    try:
        result = trainer.run(on_step=on_step, should_stop=lambda: stop["requested"], eval_every=cfg.eval_every,
                             save_every=cfg.save_every, checkpoint=periodic_checkpoint)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    if result.stop_requested:
        if periodic_checkpoint(result.history):
            print(f"checkpoint saved: continue with  python -m jaxtune train --resume {out}", file=sys.stderr)
    result.history = history + result.history
    if not lead:
        return 1 if result.diverged else 0
    samples = [{"instruction": p.instruction, "reference": p.response,
                "generated": generate(model, tokenizer, p.instruction, max_new_tokens=64)}
               for p in (val_pairs or pairs)[: cfg.samples]]
    try:
        save(model, tokenizer, out, extra_files={
            "metrics.jsonl": "".join(json.dumps(s.to_dict()) + "\n" for s in result.history),
            "samples.jsonl": "".join(json.dumps(s) + "\n" for s in samples),
            "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False)})
    except OSError as e:
        return _save_failed(e, out, trainer, checkpoint, result)
    if result.stopped:
        print(f"stopped early: {result.stopped}", file=sys.stderr)
    summary = f"{result.steps} steps in {result.seconds:.1f}s"
    if result.real_token_share is not None:
        summary += f" ({result.real_token_share:.0%} real tokens, {result.tokens / max(result.seconds, 1e-9):.0f} tokens/s)"
    if result.peak_memory is not None:
        summary += f", peak device memory {result.peak_memory / 2**30:.2f} GiB"
    if result.history:
        summary += f", final loss {result.history[-1].loss:.4f}"
    val = next((s.val_loss for s in reversed(result.history) if s.val_loss is not None), None)
    if val is not None:
        before = f"{result.initial_val_loss:.4f} -> " if result.initial_val_loss is not None else ""
        summary += f", validation loss {before}{val:.4f} (perplexity {math.exp(min(val, 700.0)):.1f})"
    summary += f"; model written to {out}"
    print(summary)
    return 1 if result.diverged else 0


def _drop_partial(checkpoints: Path, step: int) -> None:
    """Remove what a failed checkpoint write left (orbax writes into a temporary folder first)."""
    for path in checkpoints.glob(f"{step}*"):
        if path.name == str(step) or path.name.startswith(f"{step}.orbax-checkpoint-tmp"):
            shutil.rmtree(path, ignore_errors=True)


def _save_failed(error: OSError, out: Path, trainer, checkpoint, result) -> int:
    """The final model could not be written (a full disk, most often): the folder holds the previous model or
    none. Save the training state if that still fits, and say how to write the model once there is room."""
    reason = error.strerror or str(error)
    try:
        if verify_checksums(out / "checkpoints" / str(trainer.step)) is not None:  # not already saved (Ctrl-C)
            checkpoint(result.history)
        kept = f"the trained state is checkpointed at step {trainer.step} in {out / 'checkpoints'}"
    except Exception as e:  # noqa: BLE001 - the disk that refused the model may refuse this too
        _drop_partial(out / "checkpoints", trainer.step)
        steps = sorted(int(p.name) for p in (out / "checkpoints").glob("[0-9]*") if p.name.isdigit())
        print(f"warning: the checkpoint could not be written either ({getattr(e, 'strerror', None) or e})", file=sys.stderr)
        kept = (f"the last checkpoint, step {steps[-1]}, is in {out / 'checkpoints'}" if steps else
                "no checkpoint was saved during the run (use --save-every), so this run's training is lost")
    resumable = "no checkpoint" not in kept
    print(f"error: could not write the model to {out}: {reason}. Nothing half-written was left there; {kept}."
          + (f" Free some space, then write the model with  python -m jaxtune train --resume {out}" if resumable else ""),
          file=sys.stderr)
    return 3


def cmd_generate(args) -> int:
    model, tokenizer = load(args.model, allow_pickle=args.allow_pickle)
    print(generate(model, tokenizer, args.instruction, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxtune", description="Instruction-tune GPT-2 models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args) if args.command == "train" else cmd_generate(args)
    except (DataError, ModelLoadError, ConfigError, TrainingError, RunDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
