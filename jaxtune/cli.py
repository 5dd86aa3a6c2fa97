"""The command line: `python -m jaxtune train ...` and `python -m jaxtune generate ...`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from jaxtune.checkpoint import ModelLoadError, load, save
from jaxtune.config import LOSS_MODES, ConfigError, TrainConfig
from jaxtune.data import DataError, read_pairs
from jaxtune.generate import generate
from jaxtune.train import Trainer, TrainingError

_DEFAULTS = TrainConfig()


def _train_parser(sub):
    p = sub.add_parser("train", help="instruction-tune a model on a file of pairs",
                       description="Instruction-tune a GPT-2 model and write a Hugging Face directory.")
    p.add_argument("--model", default="auto", help="hub id (gpt2, distilgpt2, ...), local directory, 'tiny' "
                   "(embedded offline model) or 'auto' (gpt2 if it can be had, else tiny)")
    p.add_argument("--data", required=True, help=".jsonl, .json or .csv with instruction and response columns")
    p.add_argument("--validation-data", help="held-out pairs; their loss is reported at the end (and every --eval-every)")
    p.add_argument("--output", required=True, help="directory for the tuned model (Hugging Face layout) and metrics.jsonl")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it already holds files")
    p.add_argument("--instruction-column", help="column holding the instruction (default: instruction, prompt, question)")
    p.add_argument("--response-column", help="column holding the response (default: response, output, answer, completion)")
    p.add_argument("--epochs", type=int, default=_DEFAULTS.epochs)
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    p.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate)
    p.add_argument("--max-length", type=int, default=_DEFAULTS.max_length, help="tokens per example, EOS included")
    p.add_argument("--loss-on", choices=LOSS_MODES, default=_DEFAULTS.loss_on,
                   help="response: response + EOS (default); all: every token + EOS; reference: the reference's loss")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    p.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=_DEFAULTS.dtype)
    p.add_argument("--no-dropout", action="store_true", help="train without dropout")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pytorch_model.bin (a pickle: trusted files only)")


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


def _progress(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)

    def on_step(s):
        post = {"loss": f"{s.loss:.4f}", "tok/s": f"{s.tokens_per_sec:.0f}", "lr": f"{s.learning_rate:.2e}"}
        if s.val_loss is not None:
            post["val"] = f"{s.val_loss:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.update(s.step - bar.n)

    return bar, on_step


def cmd_train(args) -> int:
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise DataError(f"--output {out} already exists and is not empty; choose another directory or pass --overwrite")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      max_length=args.max_length, loss_on=args.loss_on, seed=args.seed, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, grad_accum=args.grad_accum, max_steps=args.max_steps,
                      dtype=args.dtype, dropout=not args.no_dropout)
    cols = dict(instruction_column=args.instruction_column, response_column=args.response_column)
    pairs = read_pairs(args.data, **cols)  # data errors surface before the model is loaded or compiled
    val_pairs = read_pairs(args.validation_data, **cols) if args.validation_data else None
    model, tokenizer = load(args.model, allow_pickle=args.allow_pickle, seed=args.seed)
    print(f"model: {getattr(model, 'source', args.model)}", file=sys.stderr)
    cfg.max_length = min(cfg.max_length, model.config.n_positions)
    trainer = Trainer(model, tokenizer, pairs, cfg, validation_pairs=val_pairs)
    print(f"data: {len(pairs)} pairs ({trainer.truncated} truncated at {cfg.max_length} tokens)"
          f"{f', {len(val_pairs)} validation pairs' if val_pairs else ''}; {trainer.total_steps} steps", file=sys.stderr)

    stop = {"requested": False}

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, save, exit; second: abort
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after this step and saving what was learned (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    bar, on_step = _progress(trainer.total_steps)
    try:
        result = trainer.run(on_step=on_step, should_stop=lambda: stop["requested"], eval_every=args.eval_every)
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    metrics = "".join(json.dumps(s.to_dict()) + "\n" for s in result.history)
    save(model, tokenizer, out, extra_files={"metrics.jsonl": metrics,
                                             "train_config.json": json.dumps(vars(cfg), indent=2, default=list) + "\n"})
    last = result.history[-1] if result.history else None
    val = next((s.val_loss for s in reversed(result.history) if s.val_loss is not None), None)
    summary = (f"{result.steps} steps in {result.seconds:.1f}s"
               + (f", final loss {last.loss:.4f}" if last else "")
               + (f", validation loss {result.initial_val_loss:.4f} -> {val:.4f}" if val is not None else "")
               + f"; model written to {out}")
    if result.stopped:
        print(f"stopped early: {result.stopped}", file=sys.stderr)
    print(summary)
    return 1 if result.stopped and "loss became" in result.stopped else 0


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
    except (DataError, ModelLoadError, ConfigError, TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
