"""Training runs: `execute` (one run, start to finish, what `python -m jaxtune train` does) and `Registry` (runs
that belong to a server, not to a request: the app's queue, workers, run folders, reattaching and resuming).

A run folder has the command line's layout: config.yaml (`python -m jaxtune train --config` repeats the run),
data.jsonl (the app's pairs), metrics.jsonl (written as steps finish), train.log (every line of the log),
run.json (status, for the runs table), checkpoints/ (orbax), and the Hugging Face model once the run ends.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from jaxtune.config import RunConfig
from jaxtune.data import DataError, EncodedSet, Pair, inspect_rows, pack_rows, read_pairs
from jaxtune.lora import merge
from jaxtune.quantize import quantized_bytes
from jaxtune.tracking import Tracker, check_reporters
from jaxtune.rundir import (RunDirError, claim, data_fingerprint, has_checkpoint, owned, prepare_output, remove_owned,
                            resume_changes, resume_conflicts, verify_checksums)

KEEP = ("checkpoints", "train.log", "run.json", "data.jsonl", "tensorboard", "wandb")  # entries a final save carries over into the model folder


@dataclass
class Outcome:
    """How a run ended: the folder, the trainer's result, the closing line and the command line's exit code."""

    out: Path
    result: object = None  # train.TrainResult
    summary: str = ""
    code: int = 0  # 0 done, 1 diverged, 3 the model could not be written
    saved: bool = False  # the Hugging Face model was written
    total_steps: int = 0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def plural(n: int, word: str) -> str:
    """"1 step", "2,048 steps"."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def held_out(pairs: int, fraction: float) -> int:
    """How many of `pairs` a validation fraction holds out (at least one, when it is set)."""
    return max(1, int(round(pairs * fraction))) if fraction else 0


def split_validation(pairs, fraction: float, seed: int):
    """(train, validation): a seeded share held out, each kept in file order."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = held_out(len(pairs), fraction)
    if n_val >= len(pairs):
        raise DataError(f"validation_fraction={fraction} leaves no training pairs out of {len(pairs)}")
    return [pairs[i] for i in sorted(order[n_val:])], [pairs[i] for i in sorted(order[:n_val])]


def _check(pairs, tokenizer, cfg: RunConfig, what: str, log):
    report = inspect_rows(pairs, tokenizer, max_length=cfg.train.max_length, loss_on=cfg.train.loss_on)
    for line in report.warnings[:10]:
        log(f"warning: {line}")
    if len(report.warnings) > 10:
        log(f"warning: ... and {len(report.warnings) - 10} more")
    if cfg.strict and report.warnings:
        raise DataError(f"{what}: {len(report.warnings)} warning(s) and --strict is set; first: {report.warnings[0]}")
    return report


def resume_config(resume: Path) -> dict:
    """The stopped run's options (its checkpoints/config.yaml)."""
    path = Path(resume) / "checkpoints" / "config.yaml"
    if not path.exists():
        raise DataError(f"--resume {resume}: no checkpoints/config.yaml there; give the --output folder of a run "
                        "that saved a checkpoint (--save-every, or Ctrl-C)")
    if not has_checkpoint(resume):  # said before the model and the data are read
        raise DataError(f"--resume {resume}: the run saved no checkpoint to resume from (it stopped before its first "
                        f"one, a second Ctrl-C, say); start it again with --output {resume} --overwrite")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def moved_model(saved: dict, cfg: RunConfig) -> str | None:
    """The run's model folder when it is gone and this resume names another folder in its place (a base that moved:
    the checkpoint's shapes are still checked against it), else None."""
    old = saved.get("model")
    if (isinstance(old, str) and old != cfg.model and Path(old).is_absolute() and not Path(old).exists()
            and Path(cfg.model).is_dir()):
        return old
    return None


def check_resume_options(resume: Path, saved: dict, cfg: RunConfig) -> None:
    """Refuse, before anything is loaded, a resume whose options would not continue the stopped run."""
    if moved_model(saved, cfg):
        saved = {**saved, "model": cfg.model}
    elif cfg.model == saved.get("model") and Path(cfg.model).is_absolute() and not Path(cfg.model).exists():
        raise DataError(f"--resume {resume}: the run's model folder {cfg.model} is gone; if it moved, give its new "
                        "place with --model DIR")
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
                        f"steps these options plan; give options that plan at least {trainer.step} steps (more "
                        "epochs, or a larger --max-steps)")


def _drop_partial(checkpoints: Path, step: int) -> None:
    """Remove what a failed checkpoint write left (orbax writes into a temporary folder first)."""
    for path in checkpoints.glob(f"{step}*"):
        if path.name == str(step) or path.name.startswith(f"{step}.orbax-checkpoint-tmp"):
            shutil.rmtree(path, ignore_errors=True)


def execute(cfg: RunConfig, *, resume: Path | None = None, overwrite: bool = False, subfolder: bool = False,
            prepared: bool = False, log: Callable[[str], None] = _stderr, on_start=None, on_step=None,
            should_stop=None, load_model=None) -> Outcome:
    """One training run, from reading the data to writing the model: what `python -m jaxtune train` does.

    prepared: the caller made `cfg.output` for this run (the app's registry) and it is not checked again.
    on_start(trainer) is called once the steps are planned; on_step and should_stop go to `Trainer.run`.
    load_model(name, seed) -> (model, tokenizer) replaces `jaxtune.load` (the app shares base models).
    Raises DataError, ModelLoadError, ConfigError, TrainingError or RunDirError with a message for the user.
    """
    import jax

    from jaxtune.checkpoint import load, save
    from jaxtune.generate import generate
    from jaxtune.model import num_params
    from jaxtune.sharding import initialize_distributed
    from jaxtune.train import Trainer, make_schedule, offloads_by_default

    resume = Path(resume) if resume else None
    saved = resume_config(resume) if resume else None
    hosts = initialize_distributed(cfg.distributed)  # before anything touches a device
    lead = jax.process_index() == 0  # on several hosts, process 0 alone prints progress and writes files
    if hosts:
        log(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
            f"{jax.device_count()} devices")
    out = Path(cfg.output)
    if not prepared:  # checked before anything is read or trained; nothing is removed until training starts
        out = prepare_output(out, overwrite=overwrite, resume=resume, subfolder=subfolder, reads={
            "--model": cfg.model, "--data": cfg.data, "--validation-data": cfg.validation_data})
    model_dir = Path(cfg.model).expanduser()
    if cfg.model not in ("tiny", "auto") and model_dir.is_dir():  # by its absolute path, as the data: the run's
        cfg.model = str(model_dir.resolve())  # config.yaml and a LoRA adapter's base work from any folder
    if resume:  # before the model is loaded: a model of another shape is named here, not by orbax
        check_resume_options(resume, saved, cfg)
    reporters = check_reporters(cfg.report_to)  # a tracker's missing package is said now, not after the model loaded
    tcfg = cfg.train
    cols = dict(instruction_column=cfg.instruction_column, response_column=cfg.response_column)
    pairs = read_pairs(cfg.data, split=cfg.split, **cols)  # data errors surface before the model is loaded or compiled
    val_pairs = read_pairs(cfg.validation_data, **cols) if cfg.validation_data else None
    # the run's config.yaml names local files by their absolute paths: --resume and --config work from any folder
    cfg.data, cfg.validation_data = (str(Path(p).resolve()) if p and Path(p).exists() else p
                                     for p in (cfg.data, cfg.validation_data))
    fingerprint = {"data_sha256": data_fingerprint(pairs)}
    if val_pairs:
        fingerprint["validation_sha256"] = data_fingerprint(val_pairs)
    if val_pairs is None and cfg.validation_fraction:
        pairs, val_pairs = split_validation(pairs, cfg.validation_fraction, tcfg.seed)
    if load_model is None:
        model, tokenizer = load(cfg.model, allow_pickle=cfg.allow_pickle, seed=tcfg.seed, host=offloads_by_default())
    else:
        model, tokenizer = load_model(cfg.model, tcfg.seed)
    log(f"model: {getattr(model, 'source', cfg.model)} ({num_params(model) / 1e6:.1f}M parameters)")
    if tcfg.max_length > model.config.n_positions:
        log(f"note: max_length {tcfg.max_length} is more than the model reads; using its {model.config.n_positions} "
            "positions")
    tcfg.max_length = min(tcfg.max_length, model.config.n_positions)
    report = _check(pairs, tokenizer, cfg, "training data", log)
    val_report = _check(val_pairs, tokenizer, cfg, "validation data", log) if val_pairs else None
    if not report.pairs:
        raise DataError(f"{cfg.data}: no row keeps any of its response within max_length {tcfg.max_length} tokens; "
                        "raise --max-length or shorten the instructions")
    encoded = EncodedSet(report.encoded, report.pairs, report.truncated, report.dropped, tcfg.max_length)
    devices = jax.device_count()
    rows = len(pack_rows([len(e.input_ids) for e in encoded.examples], tcfg.max_length)) if tcfg.pack else 0
    fits = -(-(rows or len(report.pairs)) // devices) * devices  # the data in one batch, split evenly over the devices
    if tcfg.batch_size > fits:  # a larger batch would only add rows of padding
        held = (f"{plural(rows, 'packed row')} the {plural(len(report.pairs), 'training pair')} fill" if tcfg.pack
                else plural(len(report.pairs), "training pair"))
        log(f"warning: batch_size {tcfg.batch_size} is more than the {held}; using {fits}")
        tcfg.batch_size = fits
    trainer = Trainer(model, tokenizer, encoded, tcfg, validation_pairs=val_pairs)
    fingerprint["total_steps"] = trainer.total_steps  # kept with each checkpoint: a resume says when the plan changed
    if tcfg.lora_rank:
        adapters = sum(x.size for x in jax.tree.leaves(trainer.params))
        log(f"LoRA: rank {tcfg.lora_rank} on {', '.join(tcfg.lora_targets)}, {adapters:,} trainable parameters "
            f"({adapters / num_params(model):.2%} of the model); the base is frozen"
            + (f", its projections held in {tcfg.quantize} ({quantized_bytes(model) / 2**20:,.1f} MiB)"
               if tcfg.quantize != "none" else ""))
    validation = ", " + plural(len(val_pairs), "validation pair") if val_pairs else ""
    log(f"data: {plural(len(report.pairs), 'pair')}, {report.tokens:,} tokens ({trainer.truncated} truncated at "
        f"{tcfg.max_length} tokens{f', {len(report.dropped)} left out' if report.dropped else ''}, "
        f"{len(report.warnings)} warning(s)){validation}; "
        f"{plural(trainer.total_steps, 'step')} on {jax.default_backend()}; real tokens fill "
        f"{trainer.planned_real_token_share:.0%} of the computed positions{' (packed)' if tcfg.pack else ''}")
    if cfg.model == "tiny" and tcfg.learning_rate < 1e-3 and not resume:
        log(f"note: tiny starts from random weights, and a learning rate of {tcfg.learning_rate:g} barely moves it in "
            "a short run; configs/cpu-quick.yaml trains it with 20 epochs at 5e-3")
    if tcfg.warmup_steps >= trainer.total_steps > 1 and not resume:  # make_schedule cuts it to the run
        log(f"note: the warmup of {plural(tcfg.warmup_steps, 'step')} is not shorter than the run's "
            f"{plural(trainer.total_steps, 'step')}: the learning rate rises over {trainer.total_steps - 1} of them "
            f"and reaches {tcfg.learning_rate:g} only at the last; lower the warmup steps (--warmup-steps), a tenth of "
            "the run is common")

    checkpoints = out / "checkpoints"
    history = []
    if resume:
        history = trainer.restore_checkpoint(resume / "checkpoints", warn=lambda m: log(f"warning: {m}"))
        _check_resume(resume, saved, cfg, fingerprint, trainer)
        log(f"resuming {resume} at step {trainer.step}/{trainer.total_steps}")
        planned = trainer.checkpoint_extra.get("total_steps")  # (checkpoints written before it was kept: unknown)
        if planned and planned != trainer.total_steps and trainer.step < trainer.total_steps:
            before = float(make_schedule(tcfg, planned)(trainer.step))
            log(f"note: the run now plans {plural(trainer.total_steps, 'step')}, not {planned:,}: its learning-rate "
                f"schedule is recomputed over them, so step {trainer.step + 1} takes "
                f"{float(trainer.learning_rate(trainer.step)):.3g} where the old plan gave {before:.3g}")
        changed = resume_changes(saved, cfg.to_dict())
        if (gone := moved_model(saved, cfg)) is not None:
            log(f"the run's model folder {gone} is gone: this resume reads {cfg.model} in its place, which must hold "
                "the same weights")
            changed.insert(0, f"model: {gone!r} -> {cfg.model!r} (moved)")
        resumes = list(trainer.checkpoint_extra.get("resumes") or [])
        trains = trainer.step < trainer.total_steps and not trainer.finished_early(cfg.early_stopping)
        options = [c for c in changed if not c.endswith("(moved)")]
        if options and not trains:  # they would be recorded as the run's, though no step used them
            raise DataError(f"--resume {resume}: the run has no step left to run (the checkpoint holds step "
                            f"{trainer.step}), so {'; '.join(options)} would apply to no step, yet be recorded as "
                            f"the run's; leave {'it' if len(options) == 1 else 'them'} out, or plan more steps "
                            "(--max-steps, --epochs) to train on")
        if any(c.startswith("max_steps:") for c in changed) and (tcfg.max_steps or 0) > trainer.total_steps:
            log(f"note: --max-steps {tcfg.max_steps} is more than the {plural(trainer.total_steps, 'step')} "
                f"{plural(tcfg.epochs, 'epoch')} plan, so the run ends at step {trainer.total_steps}; raise --epochs "
                "to train longer")
        if changed:  # allowed (they change neither shapes nor data), and said: the steps from here use the new values
            log(f"from step {trainer.step + 1} on: {'; '.join(changed)} (config.yaml now holds the new values)")
        if changed or trains:  # each resume that trains or changes something
            resumes.append({"step": trainer.step, "changes": changed})
        if resumes:  # carried by later checkpoints, for the model card: config.yaml alone no longer repeats the run
            fingerprint["resumes"] = resumes
    if overwrite and lead and out.exists() and not (resume and out.resolve() == resume.resolve()):
        removed = remove_owned(out)  # the run being replaced: only what jaxtune wrote there
        if removed:
            log(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")
    if lead:  # metrics.jsonl grows as steps finish, so a long run can be watched (and survives a crash)
        claim(out, ["metrics.jsonl"])
        (out / "metrics.jsonl").write_text("".join(json.dumps(s.to_dict()) + "\n" for s in history))
    tracker = None
    if lead and reporters:
        claim(out, [name for name in ("tensorboard", "wandb") if name in reporters])
        tracker = Tracker(reporters, run_dir=out, name=out.name, config=cfg.to_dict())
        for s in history:
            tracker.log(s.to_dict())
    if on_start:
        on_start(trainer)

    def step_done(s):
        if lead:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(s.to_dict()) + "\n")
            if tracker:
                tracker.log(s.to_dict())
        if on_step:
            on_step(s)

    def checkpoint(steps):  # every host takes part: orbax writes each host's shards
        if lead:
            claim(out, ["checkpoints"])
            checkpoints.mkdir(parents=True, exist_ok=True)
            (checkpoints / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trainer.save_checkpoint(checkpoints, keep=cfg.keep_checkpoints, history=history + steps, extra=fingerprint)

    def periodic_checkpoint(steps) -> bool:  # a checkpoint that cannot be written does not end the run
        try:
            checkpoint(steps)
            return True
        except OSError as e:
            _drop_partial(checkpoints, trainer.step)
            log(f"warning: the checkpoint of step {trainer.step} could not be written ({e.strerror or e}); "
                "training goes on")
            return False

    eval_every = cfg.eval_every
    if cfg.early_stopping:
        eval_every = eval_every or trainer.default_eval_every()
        log(f"early stopping: the validation loss every {plural(eval_every, 'step')}; the run stops after "
            f"{plural(cfg.early_stopping, 'evaluation')} without a new lowest, and the model keeps the weights of the "
            "lowest")
        if trainer.total_steps // eval_every <= cfg.early_stopping:
            log(f"warning: {plural(trainer.total_steps, 'step')} evaluated every {plural(eval_every, 'step')} hold "
                f"{plural(trainer.total_steps // eval_every, 'evaluation')}, too few for {cfg.early_stopping} without a "
                "new lowest to end the run early (it still keeps the lowest's weights); lower --eval-every")
    try:
        result = trainer.run(on_step=step_done, should_stop=should_stop, eval_every=eval_every,
                             save_every=cfg.save_every, checkpoint=periodic_checkpoint,
                             early_stopping=cfg.early_stopping)
    finally:
        if tracker:
            tracker.close()
    outcome = Outcome(out, result, code=1 if result.diverged else 0, total_steps=trainer.total_steps)
    # a stopped run keeps where it stopped; a finished one with checkpoints keeps its last step too, so that --resume
    # with more epochs or --max-steps continues from it instead of recomputing the steps since the last periodic one
    final = bool(cfg.save_every) and not result.diverged and not result.stop_requested and trainer.step > 0
    if (result.stop_requested or final) and periodic_checkpoint(result.history) and result.stop_requested:
        log(f"checkpoint saved at step {trainer.step}: continue with  python -m jaxtune train --resume {out}")
    result.history = history + result.history
    if not lead:
        return outcome
    held = (val_report or report).pairs[: cfg.samples]  # rows the check kept: one left out may not fit the model
    try:
        answers = generate(model, tokenizer, [p.instruction for p in held], max_new_tokens=64) if held else []
    except ValueError as e:  # a prompt the model cannot read: the samples are left out, never the model
        log(f"warning: no samples.jsonl: {e}")
        held, answers = [], []
    samples = [{"instruction": p.instruction, "reference": p.response, "generated": a} for p, a in zip(held, answers)]
    val = next((s.val_loss for s in reversed(result.history) if s.val_loss is not None), None)
    if result.best_step is not None:  # early stopping: the model is the best step's, and so is its loss
        val = result.best_val_loss
    base_name = cfg.model  # 'auto' is named by what it chose: gpt2 when it found it (its source says so)
    if base_name == "auto" and str(getattr(model, "source", "")).startswith("gpt2"):
        base_name = "gpt2"
    run_info = {"base_model": base_name, "source": getattr(model, "source", cfg.model), "config": cfg.to_dict(),
                "pairs": len(report.pairs), "validation_pairs": len(val_pairs or []), "steps": trainer.step,
                "seconds": trainer.elapsed_before + result.seconds, "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
                "final_loss": result.final_loss, "val_loss": val, "initial_val_loss": result.initial_val_loss,
                "total_steps": trainer.total_steps, "cut_by_max_steps": trainer.cut_by_max_steps,
                "stopped": result.stopped, "best_step": result.best_step,
                "resumes": fingerprint.get("resumes", [])}
    lora = bool(tcfg.lora_rank)
    from jaxtune.evaluate import FILES as EVAL_FILES

    stale = [name for name in EVAL_FILES if name in owned(out)]  # `eval` of the folder's model before these steps
    try:  # a LoRA folder names its base where load found it (model.origin), or holds a copy (base/): see `save`
        save(model, tokenizer, out, keep=KEEP + ("base", "merged"), run_info=run_info, overwrite=True, extra_files={
            "metrics.jsonl": "".join(json.dumps(s.to_dict()) + "\n" for s in result.history),
            "samples.jsonl": "".join(json.dumps(s) + "\n" for s in samples),
            "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False)})
        if lora and json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base":
            log(f"the base model written to {out / 'base'}")
        if lora and cfg.merge:
            claim(out, ["merged"])
            save(merge(model), tokenizer, out / "merged", run_info=run_info, role="merged")
            log(f"the merged model written to {out / 'merged'}")
    except OSError as e:
        outcome.code, outcome.summary = 3, _save_failed(e, out, trainer, checkpoint, result, log)
        return outcome
    outcome.saved = True
    if stale:
        log(f"{', '.join(stale)} went with the model they evaluated: run python -m jaxtune eval on {out} again")
    if result.stopped:
        log(result.stopped if result.stop_requested else f"stopped early: {result.stopped}")
    outcome.summary = summarize(result, out)
    return outcome


def summarize(result, out: Path) -> str:
    """The closing line: steps, speed, memory, losses and where the model is."""
    ran = result.steps - result.first_step + 1
    if ran <= 0 and result.stop_requested:  # Ctrl-C or Stop before the first step of this call
        summary = "stopped before " + ("the first step" if result.steps == 0 else f"step {result.steps + 1}")
    elif ran <= 0:  # a resume of a run whose checkpoint is its last step, or one that early stopping ended
        summary = (f"no step left to run (the checkpoint holds step {result.steps}, "
                   + ("where early stopping ended the run: raise --early-stopping, or leave it out, to go on)"
                      if result.best_step is not None and result.stopped else "the last)"))
    else:
        summary = plural(ran, "step") + ("" if result.first_step == 1 else f" (step {result.steps})" if ran == 1
                                         else f" ({result.first_step} to {result.steps})")
    summary += f" in {result.seconds:.1f}s"
    if result.real_token_share is not None:
        summary += f" ({result.real_token_share:.0%} real tokens, {result.tokens / max(result.seconds, 1e-9):.0f} tokens/s"
        # the whole call's rate counts compiling and the first step; a long run's rate is the steps after it
        steps = [s for s in result.history if s.step >= result.first_step]
        if len(steps) > 2 and steps[-1].elapsed > steps[0].elapsed:
            steady = sum(s.tokens for s in steps[1:]) / (steps[-1].elapsed - steps[0].elapsed)
            summary += f" in all, {steady:.0f} after the first step"
        summary += ")"
    if result.peak_memory is not None:
        summary += f", peak device memory {result.peak_memory / 2**30:.2f} GiB"
    if result.history:
        summary += f", final loss {result.history[-1].loss:.4f}"
    val = next((s.val_loss for s in reversed(result.history) if s.val_loss is not None), None)
    kept = result.best_step is not None and result.best_step != result.steps
    if kept:  # early stopping: the model written is the best step's
        val = result.best_val_loss
    if val is not None:
        before = f"{result.initial_val_loss:.4f} -> " if result.initial_val_loss is not None else ""
        summary += f", validation loss {before}{val:.4f} (perplexity {math.exp(min(val, 700.0)):.1f})"
    if kept:
        summary += (f"; the model keeps the weights of step {result.best_step}, the lowest validation loss"
                    + (" (the starting weights)" if result.best_step == 0 else ""))
    elif result.best_step is not None:
        summary += "; the last step's validation loss was the lowest"
    return summary + f"; model written to {out}"


def _save_failed(error: OSError, out: Path, trainer, checkpoint, result, log) -> str:
    """The final model could not be written (a full disk, most often): the folder holds the previous model or
    none. Save the training state if that still fits, and say how to write the model once there is room."""
    reason = error.strerror or str(error)
    try:
        if verify_checksums(out / "checkpoints" / str(trainer.step)) is not None:  # not already saved (a stop)
            checkpoint(result.history)
        kept = f"the trained state is checkpointed at step {trainer.step} in {out / 'checkpoints'}"
    except Exception as e:  # noqa: BLE001 - the disk that refused the model may refuse this too
        _drop_partial(out / "checkpoints", trainer.step)
        steps = sorted(int(p.name) for p in (out / "checkpoints").glob("[0-9]*") if p.name.isdigit())
        log(f"warning: the checkpoint could not be written either ({getattr(e, 'strerror', None) or e})")
        kept = (f"the last checkpoint, step {steps[-1]}, is in {out / 'checkpoints'}" if steps else
                "no checkpoint was saved during the run (use --save-every), so this run's training is lost")
    resumable = "no checkpoint" not in kept
    return (f"error: could not write the model to {out}: {reason}. Nothing half-written was left there; {kept}."
            + (f" Free some space, then write the model with  python -m jaxtune train --resume {out}" if resumable else ""))


# ---------------------------------------------------------------------------------------------- registry
STATUSES = ("queued", "training", "finished", "stopped", "failed")
ACTIVE = ("queued", "training")


def default_root(*, public: bool, app_dir: Path) -> tuple[Path, int | None]:
    """(runs folder, size cap in bytes or None): $JAXTUNE_RUNS_DIR; on a Space the persistent /data when mounted,
    else a temporary folder capped at $JAXTUNE_RUNS_MAX_MB (default 4096); on a desktop runs/ beside the app."""
    raw = os.environ.get("JAXTUNE_RUNS_MAX_MB", "").strip() or "4096"
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"JAXTUNE_RUNS_MAX_MB={raw!r}: expected a whole number of megabytes, 1 or more")
    cap = int(raw) * 2**20
    if os.environ.get("JAXTUNE_RUNS_DIR"):
        return Path(os.environ["JAXTUNE_RUNS_DIR"]), (cap if public else None)
    if public:
        data = Path("/data")
        if data.is_dir() and os.access(data, os.W_OK):
            return data / "jaxtune-runs", None
        return Path(tempfile.gettempdir()) / "jaxtune-runs", cap
    return Path(app_dir) / "runs", None


@dataclass
class Run:
    """One run as the registry and the page see it; `info()` is what run.json holds."""

    id: str
    dir: Path
    name: str
    model: str
    pairs: int
    created: float
    status: str = "queued"
    started: float | None = None
    ended: float | None = None
    step: int = 0
    total_steps: int = 0
    eta: float | None = None
    tokens_per_sec: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    message: str = ""
    saved: bool = False  # the Hugging Face model is in the folder
    best_step: int | None = None  # early stopping: the step whose weights the model holds
    history: list = field(default_factory=list)
    log: list = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    stop_reason: str | None = None
    last_seen: float = field(default_factory=time.time)
    resuming: bool = False
    initial_val_loss: float | None = None  # the validation loss before the first step (the plot's step 0)
    warming_up: bool = False  # training, and its first step (the train step's compile or cache load) not done yet
    held_out: int = 0  # of `pairs`, those its validation fraction holds out (it trains on the others)
    places: list = field(default_factory=list)  # places[k]: where data.jsonl's line k + 1 came from ("row 39")

    FIELDS = ("id", "name", "model", "pairs", "created", "status", "started", "ended", "step", "total_steps",
              "train_loss", "val_loss", "message", "saved", "best_step", "initial_val_loss", "held_out")

    def info(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    @property
    def resumable(self) -> bool:
        return self.status in ("stopped", "failed") and has_checkpoint(self.dir)


class Registry:
    """Runs that live on the server: each trains in its own worker thread, at most `concurrent` at once (the
    rest wait in order), writes its folder under `root`, and outlives the page that started it.

    max_seconds caps every run's training; orphan_seconds (a Space) stops a run no page has asked about for that
    long (`seen`); both checkpoint and write the model, and the run's message says which limit stopped it.
    """

    def __init__(self, root: Path, *, concurrent: int = 1, max_seconds: float | None = None,
                 orphan_seconds: float | None = None, size_cap: int | None = None, load_model=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.concurrent, self.max_seconds, self.orphan_seconds = max(1, int(concurrent)), max_seconds, orphan_seconds
        self.size_cap, self.load_model = size_cap, load_model
        self.lock = threading.Condition()
        self.runs: dict[str, Run] = {}
        self.waiting: list[str] = []  # queued run ids, first in first out
        self.training: set[str] = set()
        self._scan()
        if orphan_seconds:
            threading.Thread(target=self._reap, daemon=True, name="jaxtune-orphans").start()

    # ------------------------------------------------------------------------------------------ on disk
    def _scan(self):
        """Runs already in the folder. One that was queued or training when the server stopped is `stopped`."""
        for path in sorted(self.root.iterdir()):
            try:
                info = json.loads((path / "run.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            run = Run(**{k: info.get(k) for k in ("id", "name", "model", "pairs", "created")}, dir=path)
            for k in Run.FIELDS[5:]:
                if info.get(k) is not None:
                    setattr(run, k, info[k])
            if run.status in ACTIVE:
                run.status, run.message = "stopped", "interrupted: the server stopped while this run was " + run.status
            run.history = _read_jsonl(path / "metrics.jsonl")
            if (path / "train.log").exists():
                run.log = (path / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()
            self.runs[run.id] = run

    def _write_info(self, run: Run):
        tmp = run.dir / ".run.json.tmp"
        tmp.write_text(json.dumps(run.info(), indent=1) + "\n")
        os.replace(tmp, run.dir / "run.json")

    @staticmethod
    def _as_given(run: Run, line: str) -> str:
        """A log line names a pair where the caller had it ("row 39" of the page's table), not by the line of
        data.jsonl, a file of the run's that the caller never saw."""
        def place(m):
            k = int(m[1]) - 1
            return run.places[k] if 0 <= k < len(run.places) and run.places[k] else m[0]
        return re.sub(r"\bdata\.jsonl line (\d+)", place, line) if run.places else line

    def _add_log(self, run: Run, line: str):
        stamp = time.strftime("%H:%M:%S")
        lines = [f"{stamp} {part}" for part in str(line).splitlines() or [""]]
        run.log.extend(lines)
        with open(run.dir / "train.log", "a", encoding="utf-8") as f:
            f.write("".join(f"{x}\n" for x in lines))

    # ------------------------------------------------------------------------------------------ starting
    def start(self, cfg: RunConfig, pairs: list[Pair], *, name: str | None = None, note: str | None = None) -> Run:
        """A new run of `cfg` on `pairs`, queued at once: its folder holds data.jsonl and config.yaml before it
        trains, so the command line can repeat it (`python -m jaxtune train --config <run>/config.yaml`)."""
        self._prune()
        run_id = secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")  # unguessable, and a safe folder name
        directory = self.root / run_id
        directory.mkdir(parents=True)
        claim(directory, ["data.jsonl", "config.yaml", "run.json", "train.log"])
        (directory / "data.jsonl").write_text("".join(
            json.dumps({"instruction": p.instruction, "response": p.response}, ensure_ascii=False) + "\n" for p in pairs),
            encoding="utf-8")
        cfg = RunConfig.from_dict({**cfg.to_dict(), "data": str((directory / "data.jsonl").absolute()),
                                   "output": str(directory.absolute())})
        (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run = Run(id=run_id, dir=directory, name=name or time.strftime("run %m-%d %H:%M:%S"), model=cfg.model,
                  places=[p.where for p in pairs], pairs=len(pairs), held_out=held_out(len(pairs), cfg.validation_fraction if cfg.validation_data is None
                                                      else 0), created=time.time())
        with self.lock:
            self.runs[run_id] = run
        if note:
            self._add_log(run, note)
        self._queue(run, cfg)
        return run

    def resume(self, run_id: str) -> Run:
        """Continue a stopped run from its last checkpoint, in its own folder."""
        run = self.get(run_id)
        if run is None:
            raise KeyError(run_id)
        if not run.resumable:
            raise RunDirError(f"{run.name} cannot be resumed: " + ("it is still " + run.status if run.status in ACTIVE
                              else "it finished" if run.status == "finished" else "it saved no checkpoint"))
        cfg = RunConfig.from_dict(yaml.safe_load((run.dir / "config.yaml").read_text(encoding="utf-8")))
        run.status, run.message, run.stop_reason, run.resuming = "queued", "", None, True
        run.stop_event = threading.Event()
        self._add_log(run, "resuming from the last checkpoint")
        self._queue(run, cfg)
        return run

    def _queue(self, run: Run, cfg: RunConfig):
        with self.lock:
            run.status = "queued"
            self.waiting.append(run.id)
        self._write_info(run)
        threading.Thread(target=self._work, args=(run, cfg), daemon=True, name=f"jaxtune-run-{run.id}").start()

    # ------------------------------------------------------------------------------------------ the worker
    def _work(self, run: Run, cfg: RunConfig):
        with self.lock:  # wait for a free slot, in order; Stop while waiting cancels the run
            while not run.stop_event.is_set() and (len(self.training) >= self.concurrent or self.waiting[0] != run.id):
                self.lock.wait(timeout=1.0)
            self.waiting.remove(run.id)
            if run.stop_event.is_set():
                run.status, run.ended = "stopped", time.time()
                run.message = (run.stop_reason or "cancelled while it waited in the queue").replace("{step}", "0")
                self.lock.notify_all()
            else:
                self.training.add(run.id)
                run.status, run.started = "training", time.time()
        self._write_info(run)
        if run.status != "training":
            self._add_log(run, run.message)
            return
        deadline = run.started + self.max_seconds if self.max_seconds else None

        def should_stop():
            if run.stop_event.is_set():
                return True
            if deadline is not None and time.time() > deadline:
                run.stop_reason = (f"the time limit of {self.max_seconds:.0f} s (JAXTUNE_MAX_TRAIN_SECONDS) was reached "
                                   "after step {step}")  # the step in flight still finishes: named at the end
                return True
            return False

        last_write, trainer_of = [0.0], []

        def on_start(trainer):
            trainer_of.append(trainer)
            run.total_steps, run.step = trainer.total_steps, trainer.step
            run.eta = run.tokens_per_sec = None  # a resumed run's pace before it stopped says nothing now
            run.warming_up = True
            if run.resuming:  # the steps before the checkpoint, as execute rewrote them: the plot goes on from them
                run.history = _read_jsonl(run.dir / "metrics.jsonl")

        def on_step(s):
            run.warming_up = False
            before = trainer_of[-1].initial_val_loss if trainer_of else None
            if before is not None and run.initial_val_loss != before:  # measured before this run's first step
                run.initial_val_loss = before
                self._add_log(run, f"validation loss before the first step: {before:.4f}")
            entry = s.to_dict()
            run.history.append(entry)
            run.step, run.total_steps, run.eta, run.tokens_per_sec = s.step, s.total_steps, s.eta, s.tokens_per_sec
            run.train_loss = s.loss
            if s.val_loss is not None:
                run.val_loss = s.val_loss
            if s.step == 1 or s.step % 10 == 0 or s.val_loss is not None or s.step == s.total_steps:
                self._add_log(run, f"step {s.step}/{s.total_steps}: loss {s.loss:.4f}"
                              + (f", validation {s.val_loss:.4f}" if s.val_loss is not None else ""))
            if time.time() - last_write[0] > 5:
                last_write[0] = time.time()
                self._write_info(run)

        if run.resuming:  # the metrics file is rewritten from the checkpoint's history
            run.history = []
        try:
            outcome = execute(cfg, resume=run.dir if run.resuming else None, prepared=True,
                              log=lambda line: self._add_log(run, self._as_given(run, line)), on_start=on_start,
                              on_step=on_step,
                              should_stop=should_stop, load_model=self.load_model)
            if run.resuming:
                run.history = _read_jsonl(run.dir / "metrics.jsonl")
            result = outcome.result
            run.saved = outcome.saved
            if outcome.code == 3:
                run.status, run.message = "failed", outcome.summary
            elif result.diverged:
                run.status, run.message = "failed", result.stopped
            elif result.stop_requested:
                run.status = "stopped"
                reason = (run.stop_reason or "stopped by request after step {step}").replace("{step}", str(result.steps))
                run.message = f"{reason}; the model keeps what it learned" + (" and was saved" if outcome.saved else "")
                if result.best_step not in (None, result.steps):  # Keep the best
                    run.message += f" (the weights of step {result.best_step}, the lowest validation loss)"
            else:
                run.status, run.message = "finished", outcome.summary
                if result.stopped:  # early stopping ended it before its plan
                    run.message = f"stopped early: {result.stopped}; {outcome.summary}"
            if result.best_step is not None:  # the model's own validation loss, not the last step's
                run.val_loss, run.best_step = result.best_val_loss, result.best_step
            run.step = result.steps
            # execute's last line (after its time) said how the run stopped: the message does not say it again
            said = run.log[-1].partition(" ")[2] if run.log else ""
            self._add_log(run, run.message[len(said) + 2:] if said and run.message.startswith(said + "; ") else
                          run.message)
        except Exception as e:  # noqa: BLE001 - the run fails, the server goes on; the log says why
            run.status, run.message = "failed", _user_message(e)
            if run.message.startswith("an internal error"):
                traceback.print_exc()  # for the server's log, not the page
            self._add_log(run, f"failed: {run.message}")
        finally:
            run.ended, run.resuming = time.time(), False
            with self.lock:
                self.training.discard(run.id)
                self.lock.notify_all()
            self._write_info(run)

    # ------------------------------------------------------------------------------------------ control
    def get(self, run_id: str | None) -> Run | None:
        return self.runs.get(run_id) if isinstance(run_id, str) else None

    def list(self, ids=None) -> list[Run]:
        """Runs, newest first: all of them, or those in `ids` (a browser's own)."""
        with self.lock:
            runs = [r for r in self.runs.values() if ids is None or r.id in ids]
        return sorted(runs, key=lambda r: r.created, reverse=True)

    def stop(self, run_id: str, reason: str | None = None) -> bool:
        """Stop a training run after its step (checkpointed, model written) or cancel a waiting one."""
        run = self.get(run_id)
        if run is None or run.status not in ACTIVE:
            return False
        run.stop_reason = reason or run.stop_reason
        run.stop_event.set()
        with self.lock:
            self.lock.notify_all()
        return True

    def delete(self, run_id: str) -> None:
        """Remove a run that is not active: the files jaxtune wrote, and the folder if nothing else is left."""
        run = self.get(run_id)
        if run is None:
            raise KeyError(run_id)
        if run.status in ACTIVE and run.stop_event.is_set():
            raise RunDirError(f"{run.name} is stopping (it finishes its step and saves); delete it once it has stopped")
        if run.status in ACTIVE:
            raise RunDirError(f"{run.name} is {run.status}; stop it before deleting it")
        remove_owned(run.dir)
        try:
            run.dir.rmdir()
        except OSError:
            pass  # something that is not jaxtune's is in there: left alone
        with self.lock:
            self.runs.pop(run_id, None)

    def seen(self, ids) -> None:
        """A page showing these runs is open (the orphan rule counts from the last call)."""
        now = time.time()
        for run_id in ids or ():
            run = self.get(run_id)
            if run is not None:
                run.last_seen = now

    def queue_text(self, run_id: str) -> str | None:
        """For a waiting run: how many are ahead, when they started, about how long they have left."""
        run = self.get(run_id)
        if run is None or run.status != "queued" or run.id not in self.waiting:
            return None
        with self.lock:
            ahead = [self.runs[i] for i in self.training] + [self.runs[i] for i in self.waiting[:self.waiting.index(run.id)]]
        if not ahead:
            return "starting…"
        parts = []
        for other in ahead[:3]:
            if other.status == "training" and other.started:
                left = f", about {_minutes(other.eta)} left" if other.eta is not None else ""
                parts.append(f"started {_minutes(time.time() - other.started)} ago{left}")
            else:
                parts.append("waiting")
        n = len(ahead)
        return f"{n} run{'s' * (n != 1)} ahead of yours ({'; '.join(parts)})"

    def _reap(self):
        while True:
            time.sleep(min(5.0, self.orphan_seconds / 4))
            now = time.time()
            for run in self.list():
                if run.status in ACTIVE and now - run.last_seen > self.orphan_seconds:
                    self.stop(run.id, f"no page had this run open for {self.orphan_seconds:.0f} s "
                                      "(JAXTUNE_ORPHAN_SECONDS); stopped after step {step}")

    def _prune(self):
        """Keep the folder under its size cap: the oldest runs that are not active go first."""
        if not self.size_cap:
            return
        sizes = {r.id: sum(p.stat().st_size for p in r.dir.rglob("*") if p.is_file()) for r in self.list()}
        total = sum(sizes.values())
        for run in reversed(self.list()):
            if total <= self.size_cap:
                break
            if run.status not in ACTIVE:
                total -= sizes.get(run.id, 0)
                self.delete(run.id)


def _minutes(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _user_message(error: Exception) -> str:
    """An error as a user reads it: jaxtune's own errors say what and why; anything else is named, not dumped."""
    from jaxtune.checkpoint import ModelLoadError
    from jaxtune.config import ConfigError
    from jaxtune.train import TrainingError

    if isinstance(error, (DataError, ModelLoadError, ConfigError, TrainingError, RunDirError, ValueError)):
        return str(error)
    if isinstance(error, MemoryError):
        return "the machine ran out of memory; use a smaller model, batch size or max length"
    return f"an internal error ({type(error).__name__}); the server log has the details"
