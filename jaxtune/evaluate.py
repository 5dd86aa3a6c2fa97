"""Evaluation: how well models answer held-out pairs, side by side.

For each model: the validation loss (the trainer's loss code: response tokens and the EOS) and its perplexity, then
every held-out instruction answered greedily, in batches, and scored against its reference: ROUGE-L F1
(`rouge-score`), exact match (whitespace-normalised), stop rate (answers that ended with EOS within the token limit)
and mean length in tokens (EOS not counted). `python -m jaxtune eval` writes eval.json (a summary per model),
eval.jsonl (per example, every model's answer side by side) and eval.md (a Markdown report).

`python -m jaxtune.evaluate --bench` times held-out answers batched against one by one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from jaxtune.data import DataError, Pair, encode_pairs, epoch_batches, format_prompt, read_pairs, tokenize_text
from jaxtune.generate import DEFAULT_BATCH_SIZE, generate_ids, response_text
from jaxtune.rundir import readable_by_all

FILES = ("eval.json", "eval.jsonl", "eval.md")
SUMMARY_FIELDS = ("val_loss", "perplexity", "rouge_l", "exact_match", "stop_rate", "mean_tokens")


@dataclass
class ModelEval:
    """One model's scores on the held-out pairs; `answers[k]` answers pair k."""

    model: str
    source: str
    examples: int
    val_loss: float
    perplexity: float
    rouge_l: float
    exact_match: float
    stop_rate: float
    mean_tokens: float
    seconds: float
    answers: list[dict] = field(default_factory=list, repr=False)  # answer, rouge_l, exact, stopped, tokens
    trained_on: int | None = None  # how many of the pairs the model trained on (`training_overlap`); None: unknown

    def summary(self) -> dict:
        """The figures as JSON takes them: a loss that is not a finite number (NaN weights) is None, named in
        `not_finite`."""
        row = {k: v for k, v in asdict(self).items() if k != "answers"}
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        return {**row, **dict.fromkeys(bad), **({"not_finite": bad} if bad else {})}


def _same(pair: Pair) -> tuple[str, str]:
    return " ".join(pair.instruction.split()), " ".join(pair.response.split())


def run_pairs(model_dir) -> tuple[list[Pair] | None, list[Pair] | None, str] | None:
    """(the pairs a jaxtune run trained on, the pairs it held out, what those are) from its config.yaml: its
    --validation-data, or the seeded --validation-fraction split of its --data (held out: [] when it had neither).
    Either list is None where it cannot be told here (a data set name, a file moved or unreadable), and `what` then
    says why; None for a folder that is not a jaxtune run's."""
    import yaml

    from jaxtune.runs import split_validation

    try:
        cfg = yaml.safe_load((Path(model_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
        data, validation = cfg.get("data"), cfg.get("validation_data")
        fraction, seed = float(cfg.get("validation_fraction") or 0), int((cfg.get("train") or {}).get("seed", 0))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None
    cols = dict(instruction_column=cfg.get("instruction_column"), response_column=cfg.get("response_column"))
    try:
        trained = read_pairs(data, **cols) if isinstance(data, str) and Path(data).is_file() else None  # no split
        if validation:
            if not Path(validation).is_file():
                return trained, None, f"its --validation-data {validation} is not a file on this machine"
            return trained, read_pairs(validation, **cols), f"{Path(validation).name}, the run's --validation-data"
    except DataError as e:
        return None, None, f"its data cannot be read ({e})"
    if not fraction:
        return trained, [], "no pairs: the run held none out"
    if trained is None:
        return None, None, f"its --data {data} is not a file on this machine (any more)"
    trained, held = split_validation(trained, fraction, seed)
    if not _holds_the_samples(model_dir, held):
        return None, None, (f"its --data {data} changed since the run: the held-out pairs its samples.jsonl answered "
                            "are not in that file's split now")
    return trained, held, (f"the validation split the run held out: {len(held):,} of {len(trained) + len(held):,} "
                           f"pairs of {Path(data).name} (fraction {fraction:g}, seed {seed})")


def _holds_the_samples(model_dir, held: list[Pair]) -> bool:
    """Whether the held-out pairs recomputed now include, in order, those the run answered at its end (its
    samples.jsonl: the first few it held out that fit the model): an edited data file splits otherwise."""
    try:
        lines = (Path(model_dir) / "samples.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        answered = [_same(Pair(r["instruction"], r["reference"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return True  # nothing to compare with
    rest = iter(_same(p) for p in held)
    return all(pair in rest for pair in answered)  # a subsequence: rows too long for the model were not answered


def data_words(data: str) -> str:
    """The held-out pairs as reports name them: a file or data set name as code, a description (`run_pairs`) as
    it reads."""
    return data if any(c.isspace() for c in data) else f"`{data}`"


def training_overlap(model_dir, pairs: list[Pair]) -> int | None:
    """How many of `pairs` a jaxtune run's model trained on (`run_pairs`), whitespace aside. Scores on such pairs
    are not held-out. None where it cannot be told."""
    split = run_pairs(model_dir)
    if split is None or split[0] is None:
        return None
    seen = {_same(p) for p in split[0]}
    return sum(_same(p) in seen for p in pairs)


def overlap_warnings(results: list["ModelEval"] | list[dict]) -> list[str]:
    """A line for each model that trained on some of the pairs it was scored on (results, or their summaries)."""
    rows = [r if isinstance(r, dict) else r.summary() for r in results]
    return [f"{r['model']} trained on {r['trained_on']:,} of these {r['examples']:,} pairs: its scores on them are "
            "not held-out" for r in rows if r.get("trained_on")]


def report_warnings(results: list["ModelEval"] | list[dict]) -> list[str]:
    """Every report's warnings: models that trained on the pairs, and figures that are not finite numbers."""
    rows = [r if isinstance(r, dict) else r.summary() for r in results]
    return overlap_warnings(rows) + [f"{r['model']}'s {' and '.join(k.replace('_', ' ') for k in r['not_finite'])} "
                                     "came out as no finite number: its weights may hold NaN or infinity"
                                     for r in rows if r.get("not_finite")]


def warning_lines(results: list["ModelEval"] | list[dict]) -> list[str]:
    """The warnings as Markdown paragraphs (eval.md, the model card), each after a blank line."""
    return [line for w in report_warnings(results) for line in ("", f"**Warning:** {w}.")]


# ---------------------------------------------------------------------------------------------- scores
def validation_loss(model, tokenizer, pairs: list[Pair], *, batch_size: int = 8) -> float:
    """Mean next-token loss over the pairs' response tokens and EOS, as the trainer reports it (its eval step, which
    the process keeps for the next model of this architecture), pairs truncated at the model's positions (at most
    1024)."""
    from flax import nnx

    from jaxtune.config import TrainConfig
    from jaxtune.train import jitted_steps

    cfg = TrainConfig(batch_size=batch_size, max_length=min(model.config.n_positions, 1024), dropout=False)
    encoded = encode_pairs(tokenizer, pairs, loss_on=cfg.loss_on, max_length=cfg.max_length)
    graphdef, params = nnx.split(model)
    step = jitted_steps(graphdef, cfg)[2]
    total, count = 0.0, 0.0
    for batch in epoch_batches(encoded.examples, batch_size=cfg.batch_size, buckets=cfg.buckets,
                               max_length=cfg.max_length, pad_id=tokenizer.eos_token_id, seed=0, epoch=0,
                               shuffle=False):
        t, c = step(params, batch)
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def _normalised(text: str) -> str:
    return " ".join(text.split())


_SCORER = None


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 of an answer against its reference (rouge-score's tokenizer: lower case, words and numbers)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"])
    return float(_SCORER.score(reference, answer)["rougeL"].fmeasure)


def score_answer(tokenizer, ids: list[int], reference: str) -> dict:
    """One answer (its new token ids) against its reference."""
    stopped = bool(ids) and ids[-1] == tokenizer.eos_token_id
    answer = response_text(tokenizer, ids)
    return {"answer": answer, "rouge_l": rouge_l(answer, reference),
            "exact": _normalised(answer) == _normalised(reference), "stopped": stopped,
            "tokens": len(ids) - int(stopped)}


def check_prompts(model, tokenizer, pairs: list[Pair], name: str) -> list[str]:
    """The pairs' prompts, each checked to fit the model: one that does not is named by its pair's place."""
    prompts = [format_prompt(p.instruction) for p in pairs]
    limit = model.config.n_positions
    for p, tokens in zip(pairs, tokenize_text(tokenizer, prompts)):
        if len(tokens.ids) >= limit:
            raise DataError(f"{p.where or 'a pair'}: its prompt is {len(tokens.ids):,} tokens, and {name} reads at most "
                            f"{limit}; shorten the instruction or leave the pair out")
    return prompts


def evaluate_model(model, tokenizer, pairs: list[Pair], *, name: str = "model", max_new_tokens: int = 64,
                   batch_size: int = DEFAULT_BATCH_SIZE,
                   on_progress: Callable[[int, int], None] | None = None) -> ModelEval:
    """The loss on the pairs, then every instruction answered greedily (in batches) and scored.
    on_progress(answered, total) follows each batch of answers (for a progress bar)."""
    if not pairs:
        raise DataError("no held-out pairs to evaluate on")
    prompts = check_prompts(model, tokenizer, pairs, name)
    start = time.perf_counter()
    loss = validation_loss(model, tokenizer, pairs)
    ids = generate_ids(model, tokenizer, prompts,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, on_progress=on_progress)
    answers = [score_answer(tokenizer, a, p.response) for a, p in zip(ids, pairs)]
    n = len(answers)
    return ModelEval(
        model=name, source=getattr(model, "source", name), examples=n, val_loss=loss,
        perplexity=math.exp(min(loss, 700.0)), rouge_l=sum(a["rouge_l"] for a in answers) / n,
        exact_match=sum(a["exact"] for a in answers) / n, stop_rate=sum(a["stopped"] for a in answers) / n,
        mean_tokens=sum(a["tokens"] for a in answers) / n, seconds=time.perf_counter() - start, answers=answers)


# ---------------------------------------------------------------------------------------------- reports
_COLUMNS = (("model", "model", "s"), ("val loss", "val_loss", ".4f"), ("perplexity", "perplexity", ".4g"),
            ("ROUGE-L", "rouge_l", ".3f"), ("exact", "exact_match", ".3f"), ("stop rate", "stop_rate", ".3f"),
            ("mean tokens", "mean_tokens", ".1f"))


def _cells(r: ModelEval | dict, columns=_COLUMNS) -> list[str]:
    """A model's summary row as every report writes it (a ModelEval, or its summary as a dict); a figure it lacks
    is an empty cell."""
    row = r if isinstance(r, dict) else r.summary()
    return ["" if row.get(key) is None else format(row[key], spec) for _, key, spec in columns]


def summary_markdown(results: list[ModelEval] | list[dict]) -> list[str]:
    """The summary as a Markdown table's lines (eval.md's and the model card's): the columns any row has a figure
    for, the model's first."""
    rows = [r if isinstance(r, dict) else r.summary() for r in results]
    columns = [c for c in _COLUMNS if c[1] == "model" or any(row.get(c[1]) is not None for row in rows)]
    return (["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(_md(c) for c in _cells(row, columns)) + " |" for row in rows])


def held_out_words(results: list[ModelEval] | list[dict]) -> str:
    """What the scored pairs are: "held-out pairs", or "pairs" where a model trained on some of them."""
    return "pairs" if overlap_warnings(results) else "held-out pairs"


def table(results: list[ModelEval]) -> str:
    """The summary as aligned plain text, for the terminal."""
    rows = [[c[0] for c in _COLUMNS]] + [_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]])


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def markdown(results: list[ModelEval], pairs: list[Pair], *, data: str, max_new_tokens: int,
             examples: int = 100) -> str:
    """The report: the summary table, then the first `examples` answers beside their references."""
    lines = ["# Evaluation", "",
             f"{len(pairs)} {held_out_words(results)} from {data_words(data)}; greedy answers of at most "
             f"{max_new_tokens} new tokens. Validation loss: response tokens and EOS. ROUGE-L: F1. Exact: "
             "whitespace-normalised. Stop rate: answers that ended with EOS within the limit. Mean tokens: EOS not "
             "counted.", "",
             *summary_markdown(results)]
    lines += warning_lines(results)
    shown = min(len(pairs), examples)
    lines += ["", "## Answers", "", f"The first {shown} of {len(pairs)} examples (all of them are in eval.jsonl); "
              "each answer is followed by its ROUGE-L.", "",
              "| instruction | reference | " + " | ".join(_md(r.model) for r in results) + " |",
              "|" + "---|" * (2 + len(results))]
    for k in range(shown):
        answers = [f"{_md(r.answers[k]['answer'])} ({r.answers[k]['rouge_l']:.2f})" for r in results]
        lines.append(f"| {_md(pairs[k].instruction)} | {_md(pairs[k].response)} | " + " | ".join(answers) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        readable_by_all(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_reports(results: list[ModelEval], pairs: list[Pair], directory, *, data: str,
                  max_new_tokens: int) -> list[Path]:
    """eval.json, eval.jsonl and eval.md in `directory`, each written whole (a temporary name, then renamed). In a
    jaxtune run directory they are recorded as jaxtune's files."""
    from jaxtune.card import add_evaluation
    from jaxtune.rundir import MANIFEST, claim

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    summary = {"data": data, "examples": len(pairs), "max_new_tokens": max_new_tokens, "decoding": "greedy",
               "models": [r.summary() for r in results]}
    per_example = [json.dumps({"index": k, "instruction": p.instruction, "reference": p.response,
                               "answers": {r.model: r.answers[k] for r in results}}, ensure_ascii=False)
                   for k, p in enumerate(pairs)]
    texts = {"eval.json": json.dumps(summary, indent=1) + "\n", "eval.jsonl": "\n".join(per_example) + "\n",
             "eval.md": markdown(results, pairs, data=data, max_new_tokens=max_new_tokens)}
    run_folder = (directory / MANIFEST).exists()
    for name, text in texts.items():
        _write_atomic(directory / name, text)
    claim(directory, FILES)  # recorded as jaxtune's, so that a later report may replace them
    if run_folder:  # the model card's table, which travels with the model: no local paths in it
        names = _card_names([r.model for r in results], directory)
        rows = [{**r.summary(), "model": name} for r, name in zip(results, names)]
        add_evaluation(directory / "README.md", rows, data=Path(data).name if Path(data).is_file() else data,
                       max_new_tokens=max_new_tokens)
    return [directory / name for name in FILES]


def _card_names(labels: list[str], card_folder: Path) -> list[str]:
    """The models as the card in `card_folder` names them, each once and without local paths: "this model" for the
    card's own, a local folder or file by its name (with as many parent folders as tell two of the same name
    apart), a hub id as it is; a model given twice ("X (2)", see `_labels`) as X's name, numbered."""
    import re

    bases, numbers = [], []
    for label in labels:
        twice = re.fullmatch(r"(.+) \((\d+)\)", label)
        repeat = twice and twice[1] in labels and not Path(label).expanduser().exists()
        bases.append(twice[1] if repeat else label)
        numbers.append(f" ({twice[2]})" if repeat else "")
    keys, parts = [], []  # a local model: its resolved path and that path's parts (no root); else the label
    for base in bases:
        path = Path(base).expanduser()
        keys.append(path.resolve() if path.exists() else base)
        parts.append(keys[-1].parts[1:] if path.exists() else None)
    own = [key == Path(card_folder).resolve() for key in keys]
    depth = [1] * len(bases)

    def name(i):
        return "this model" if own[i] else bases[i] if parts[i] is None else "/".join(parts[i][-depth[i]:])

    while True:  # a name two different models share takes one more parent folder, while there is one
        grow = [i for i in range(len(bases)) if parts[i] and not own[i] and depth[i] < len(parts[i])
                and any(name(j) == name(i) and keys[j] != keys[i] for j in range(len(bases)))]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    names = [name(i) + numbers[i] for i in range(len(bases))]
    return [n if names.index(n) == i else f"{n} ({names[:i].count(n) + 1})" for i, n in enumerate(names)]


def _labels(names: list[str]) -> list[str]:
    """Each model's label in the reports: its name as given, numbered when given twice."""
    out = []
    for name in names:
        label, n = name, 2
        while label in out:
            label, n = f"{name} ({n})", n + 1
        out.append(label)
    return out


def report_directory(models: list[str], output: str | None) -> Path:
    """--output, else the first model's directory when it is a local folder; a DataError says what to pass."""
    if output:
        from jaxtune.rundir import MANIFEST

        path = Path(output)
        if path.exists() and not path.is_dir():
            raise DataError(f"--output {path}: a file is in the way; give a folder")
        given = {Path(m).expanduser().resolve() for m in models if Path(m).expanduser().is_dir()}
        if (path / MANIFEST).exists() and path.resolve() not in given:  # its card and reports are its own model's
            raise DataError(f"--output {path} is the folder of another run, whose model card and eval reports are "
                            "about its own model; give --output with a new folder (or evaluate that run with --model)")
    elif Path(models[0]).is_dir():
        path = Path(models[0])
    else:
        raise DataError(f"--model {models[0]} is not a local folder to write the report into; give --output DIR")
    return _writable_for_reports(path, "--output" if output else "the model's folder")


def _writable_for_reports(path: Path, what: str) -> Path:
    """Checked before any model answers: the reports can be written there, and replace no file of the user's (an
    eval.* that jaxtune did not write, by the folder's record of its files)."""
    from jaxtune.rundir import owned

    theirs = [name for name in FILES if (path / name).exists() and name not in owned(path)]
    if theirs:
        raise DataError(f"{what} {path} holds {', '.join(theirs)}, which jaxtune did not write; give --output with "
                        "another folder for the reports")
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)  # made when reports are written
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise DataError(f"{what} {path}: the reports cannot be written there ({e.strerror or e}); give --output "
                        "with a folder you can write to") from None
    return path


def held_out_pairs(model_dir) -> tuple[list[Pair], str]:
    """(pairs, what they are): the pairs a jaxtune run held out (`run_pairs`), for `eval` without --data."""
    split = run_pairs(Path(model_dir).expanduser())
    if split is None:
        raise DataError(f"give --data: {model_dir} is not a jaxtune run folder (it has no readable config.yaml), so "
                        "the pairs it held out are not known")
    if split[1] is None:
        raise DataError(f"give --data: the pairs {model_dir} held out are not known here: {split[2]}")
    if not split[1]:
        raise DataError(f"give --data: {model_dir} held no pairs out (it ran with neither --validation-data nor "
                        "--validation-fraction), so every pair of its data was trained on")
    return split[1], split[2]


def run(models: list[str], data: str | None, *, max_new_tokens: int = 64, output: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE, allow_pickle: bool = False, instruction_column: str | None = None,
        response_column: str | None = None, base: str | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
    """What `python -m jaxtune eval` does: read the pairs (data None: those the first model's run held out), load
    and evaluate each model in turn, write the reports.
    `base` loads every LoRA adapter among the models on that base instead of the one it names (a base that moved).
    Returns (results, written paths). Raises DataError or ModelLoadError with a message for the user."""
    from jaxtune.checkpoint import ModelLoadError, check_available, load
    from jaxtune.config import checked_int
    from jaxtune.lora import is_adapter_dir

    max_new_tokens = checked_int("max_new_tokens", max_new_tokens, 1, 2**20)
    batch_size = checked_int("batch_size", batch_size, 1, 4096)
    for name in models:  # a mistyped folder or name is said before any model is evaluated, not after the first
        if str(name) not in ("auto", "tiny") and not Path(name).expanduser().is_dir():
            check_available(str(name))
    adapters = [name for name in models if Path(name).expanduser().is_dir() and is_adapter_dir(Path(name).expanduser())]
    if base is not None and not adapters:
        raise ModelLoadError(f"--base {base} is for LoRA adapter folders, and none of {', '.join(map(str, models))} is "
                             "one: it would be ignored. Leave --base out")
    if data is None:
        try:
            pairs, data = held_out_pairs(models[0])
        except DataError as e:
            runs = [m for m in models[1:] if Path(m).expanduser().is_dir() and run_pairs(Path(m).expanduser())]
            if not runs:
                raise
            raise DataError(f"{e}; or name the run first (--model {runs[0]}): without --data, eval scores the pairs "
                            "the --model run held out") from None
        log(f"held-out pairs: {data}")
    else:
        pairs = read_pairs(data, instruction_column=instruction_column, response_column=response_column)
    if not pairs:
        raise DataError(f"{data}: no held-out pairs")
    directory = report_directory(models, output)
    results = []
    for label, name in zip(_labels(models), models):
        model, tokenizer = load(name, allow_pickle=allow_pickle, base=base if name in adapters else None)
        check_prompts(model, tokenizer, pairs, label)  # before the line that says the work begins
        log(f"{label}: loss on {len(pairs)} pairs, then answering them ...")
        results.append(evaluate_model(model, tokenizer, pairs, name=label, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size))
        results[-1].trained_on = training_overlap(name, pairs) if Path(name).expanduser().is_dir() else None
        log(f"{label}: done in {results[-1].seconds:.1f}s")
        del model
    for line in report_warnings(results):
        log(f"warning: {line}")
    return results, write_reports(results, pairs, directory, data=str(data), max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------------------------- benchmark
def bench(model_name: str = "tiny", data: str = "examples/customer_service_val.jsonl", *, n: int = 64,
          max_new_tokens: int = 64, batch_size: int = DEFAULT_BATCH_SIZE, repeat: int = 3, preset: str | None = None) -> dict:
    """Seconds to answer n held-out instructions (the file repeated to n) greedily, batched and one by one, after a
    first, compiling pass of each; the best of `repeat` alternating rounds (the machine may be shared). preset:
    instead of `model_name`, random weights of this architecture (no download: e.g. gpt2 on a machine offline)."""
    import jax

    from jaxtune.checkpoint import load, offline_tokenizer
    from jaxtune.config import PRESETS
    from jaxtune.data import tokenize_text
    from jaxtune.model import build

    if preset:
        model, tokenizer = build(PRESETS[preset]), offline_tokenizer()
        model.source = f"{preset} shape, random weights"
    else:
        model, tokenizer = load(model_name)
    pairs = read_pairs(data)
    prompts = [format_prompt(pairs[k % len(pairs)].instruction) for k in range(n)]
    kw = dict(max_new_tokens=max_new_tokens)
    by_length = {len(t.ids): p for t, p in zip(tokenize_text(tokenizer, prompts), prompts)}
    generate_ids(model, tokenizer, prompts, batch_size=batch_size, **kw)  # compile: every program both ways use
    for p in by_length.values():
        generate_ids(model, tokenizer, p, **kw)
    t_batched = t_single = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        batched = generate_ids(model, tokenizer, prompts, batch_size=batch_size, **kw)
        t_batched = min(t_batched, time.perf_counter() - start)
        start = time.perf_counter()
        single = [generate_ids(model, tokenizer, p, **kw) for p in prompts]
        t_single = min(t_single, time.perf_counter() - start)
    tokens = sum(len(a) for a in batched)
    return {"model": getattr(model, "source", model_name), "backend": jax.default_backend(), "answers": n,
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "new_tokens": tokens,
            "stopped": sum(bool(a) and a[-1] == tokenizer.eos_token_id for a in batched),
            "batched_s": t_batched, "one_by_one_s": t_single, "speedup": t_single / t_batched,
            "batched_tokens_per_s": tokens / t_batched, "one_by_one_tokens_per_s": tokens / t_single,
            "same_answers": batched == single}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxtune.evaluate",
                                description="Benchmark: held-out answers batched against one by one. For evaluation "
                                            "use python -m jaxtune eval.")
    p.add_argument("--bench", action="store_true", required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--preset", help="instead of --model: random weights of this architecture (gpt2, gpt2-medium, ...)")
    p.add_argument("--data", default="examples/customer_service_val.jsonl")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, nargs="+", default=[DEFAULT_BATCH_SIZE])
    p.add_argument("--repeat", type=int, default=3, help="rounds of each; the best is kept")
    p.add_argument("--json", help="also write the figures (one entry per batch size) to this file")
    args = p.parse_args(argv)
    results = []
    for b in args.batch_size:
        r = bench(args.model, args.data, n=args.n, max_new_tokens=args.max_new_tokens, batch_size=b, repeat=args.repeat,
                  preset=args.preset)
        print(f"{r['answers']} answers, {r['model']}, {r['backend']}, batch {b}, "
              f"at most {r['max_new_tokens']} new tokens "
              f"({r['new_tokens']} written, {r['stopped']} stopped at EOS): "
              f"batched {r['batched_s']:.2f}s ({r['batched_tokens_per_s']:.0f} tok/s), "
              f"one by one {r['one_by_one_s']:.2f}s ({r['one_by_one_tokens_per_s']:.0f} tok/s): "
              f"{r['speedup']:.1f}x; same answers: {r['same_answers']}", flush=True)
        results.append({**r, "batch_size": b})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
