"""`python -m jaxtune eval`: a model trained to answer exactly scores full marks, the untrained base does not."""

import json
import math

import pytest

from jaxtune import Pair, TrainConfig, Trainer, load, save
from jaxtune.cli import main
from jaxtune.config import GPT2Config
from jaxtune.data import tokenize_text
from jaxtune.evaluate import rouge_l, validation_loss
from jaxtune.model import build
from jaxtune.rundir import owned

PAIRS = [Pair("Answer politely", "Of course, how may I assist you?"), Pair("Provide price", "The price is $99."),
         Pair("Can I return shoes?", "Yes, within 30 days, with the receipt."),
         Pair("Do you ship abroad?", "We ship to 40 countries."), Pair("Is there a store?", "No, we sell online only."),
         Pair("How do I pay?", "By card or bank transfer.")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(trained run folder, untrained base folder, the trainer's own validation loss on PAIRS)."""
    root = tmp_path_factory.mktemp("eval")
    tok = load("tiny")[1]
    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4)
    save(build(config, seed=0), tok, root / "base")
    model = build(config, seed=0)
    cfg = TrainConfig(epochs=60, batch_size=6, learning_rate=1e-2, warmup_steps=10, max_length=32, dropout=False,
                      buckets=(16, 32))
    trainer = Trainer(model, tok, PAIRS, cfg, validation_pairs=PAIRS)
    trainer.run()
    save(model, tok, root / "tuned")
    return root / "tuned", root / "base", trainer.validation_loss()


def write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"instruction": p.instruction, "response": p.response}) + "\n" for p in pairs))
    return path


def test_trained_model_scores_full_marks_and_the_base_does_not(models, tmp_path, capsys):
    tuned, base, trainer_loss = models
    data = write_jsonl(tmp_path / "held_out.jsonl", PAIRS)
    assert main(["eval", "--model", str(tuned), "--compare", str(base), "--data", str(data),
                 "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "ROUGE-L" in out and str(tuned) in out and str(base) in out

    summary = json.loads((tuned / "eval.json").read_text())  # the first model's folder, by default
    assert summary["examples"] == 6 and summary["max_new_tokens"] == 24
    ours, theirs = summary["models"]
    assert ours["model"] == str(tuned) and theirs["model"] == str(base)
    assert ours["rouge_l"] == 1.0 and ours["exact_match"] == 1.0 and ours["stop_rate"] == 1.0
    tok = load("tiny")[1]
    lengths = [len(t.ids) for t in tokenize_text(tok, [" " + p.response for p in PAIRS])]
    assert ours["mean_tokens"] == sum(lengths) / 6  # the references' own length: EOS not counted
    assert ours["val_loss"] == pytest.approx(trainer_loss, rel=1e-5)  # the trainer's loss, on the same pairs
    assert ours["perplexity"] == pytest.approx(math.exp(ours["val_loss"]))
    # the base never stops within 24 tokens and shares little with the references
    assert theirs["rouge_l"] < 0.2 and theirs["exact_match"] == 0 and theirs["stop_rate"] == 0
    assert theirs["mean_tokens"] == 24 and theirs["val_loss"] > 10 > 1 > ours["val_loss"]

    rows = [json.loads(line) for line in (tuned / "eval.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [p.instruction for p in PAIRS]
    for row, pair in zip(rows, PAIRS):
        assert set(row["answers"]) == {str(tuned), str(base)} and row["reference"] == pair.response
        assert row["answers"][str(tuned)] == {"answer": pair.response, "rouge_l": 1.0, "exact": True, "stopped": True,
                                              "tokens": lengths[PAIRS.index(pair)]}
        assert row["answers"][str(base)]["stopped"] is False
    report = (tuned / "eval.md").read_text()
    assert "| model | val loss | perplexity | ROUGE-L | exact | stop rate | mean tokens |" in report
    assert f"| {PAIRS[1].instruction} | {PAIRS[1].response} | {PAIRS[1].response} (1.00) |" in report
    assert {"eval.json", "eval.jsonl", "eval.md"} <= owned(tuned)  # recorded as jaxtune's files of the run
    assert len({(tuned / n).stat().st_mode & 0o777 for n in ("eval.md", "config.json")}) == 1  # not mkstemp's 0600
    card = (tuned / "README.md").read_text()  # the model card gets the evaluation table
    assert "## Evaluation" in card and "held-out pairs in `held_out.jsonl`" in card and card.count("## Evaluation") == 1
    row = next(line for line in report.splitlines() if line.startswith(f"| {tuned} |"))  # eval.md's figures
    assert row.replace(str(tuned), "this model") in card and card.index("## Evaluation") < card.index("## Limitations")
    assert f"| {base.name} | " in card and str(tmp_path) not in card  # no local paths in a card that may be pushed

    # --output elsewhere, the same model twice: labels stay apart
    assert main(["eval", "--model", str(base), "--compare", str(base), "--data", str(data), "--max-new-tokens", "4",
                 "--output", str(tmp_path / "report")]) == 0
    models_ = json.loads((tmp_path / "report" / "eval.json").read_text())["models"]
    assert [m["model"] for m in models_] == [str(base), f"{base} (2)"] and models_[0]["mean_tokens"] == 4


def test_rouge_l_and_the_library_loss():
    assert rouge_l("The price is $99.", "The price is $99.") == 1.0
    assert rouge_l("the PRICE is 99", "The price is $99.") == 1.0  # rouge-score's tokens: lower case, no punctuation
    assert rouge_l("price", "The price is $99.") == pytest.approx(2 * (1 * 0.25) / 1.25)
    assert rouge_l("", "The price is $99.") == 0.0
    model, tok = load("tiny")
    assert validation_loss(model, tok, PAIRS[:2]) > 10  # untrained: about log(50257)


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/absent", "--data", "{data}", "--output", "{tmp}/out"],
     "model directory {tmp}/absent does not exist"),
    (["--model", "{base}", "--compare", "{tmp}/absent", "--data", "{data}"],
     "model directory {tmp}/absent does not exist"),
    (["--model", "{base}", "--compare", "no-such-model-xyz", "--data", "{data}", "--output", "{tmp}/out"],
     "no-such-model-xyz"),  # a hub id
    (["--model", "{base}", "--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    (["--model", "tiny", "--data", "{data}"], "give --output DIR"),
    (["--model", "{base}", "--data", "{data}", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--model", "{base}", "--data", "{data}", "--batch-size", "0"], "--batch-size 0"),
    (["--model", "{base}", "--data", "{data}", "--output", "{tmp}/mine"],
     "--output {tmp}/mine holds eval.md, which jaxtune did not write; give --output with another folder"),
    (["--model", "{base}", "--data", "{data}", "--output", "{tmp}/held_out.jsonl/x"], "the reports cannot be written"),
    (["--model", "{base}", "--data", "{tmp}/long.jsonl", "--output", "{tmp}/out"],  # it said 'prompt 2 of 2'
     "long.jsonl line 2: its prompt is"),
    (["--model", "{base}", "--output", "{tmp}/out"],  # no --data, and not a run folder: its held-out pairs unknown
     "give --data: {base} is not a jaxtune run folder (it has no readable config.yaml)"),
    (["--model", "{base}", "--data", "{data}", "--output", "{tmp}/other"],  # it rewrote the other run's card
     "--output {tmp}/other is the folder of another run, whose model card and eval reports are about its own model"),
])
def test_errors_are_clear(models, tmp_path, capsys, args, message):
    _, base, _ = models
    data = write_jsonl(tmp_path / "held_out.jsonl", PAIRS[:1])
    write_jsonl(tmp_path / "long.jsonl", [PAIRS[0], Pair("word " * 200, "ok")])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "eval.md").write_text("my own notes")  # never replaced, and said before any model answers
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".jaxtune-run.json").write_text("{}")  # another run's folder
    message = message.format(tmp=tmp_path, base=base)
    args = [a.format(tmp=tmp_path, data=data, base=base) for a in args]
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert (tmp_path / "mine" / "eval.md").read_text() == "my own notes"
    assert not (tmp_path / "out").exists()  # no empty report folder left behind by a run that failed
    assert "loss on" not in err, err  # refused before any model answered (a mistyped --compare: after the first)


def test_the_batched_answer_benchmark_writes_its_figures(tmp_path):
    """`python -m jaxtune.evaluate --bench`: held-out answers batched against one by one, the same answers either
    way (greedy), figures in JSON (benchmarks/gpu.sh collects them). Speed itself is not asserted."""
    import subprocess
    import sys

    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, "-m", "jaxtune.evaluate", "--bench", "--n", "6", "--max-new-tokens", "6",
                        "--repeat", "1", "--batch-size", "8", "--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (r,) = json.loads(out.read_text())
    assert r["answers"] == 6 and r["batch_size"] == 8 and r["same_answers"] is True
    assert r["batched_s"] > 0 and r["one_by_one_s"] > 0 and r["speedup"] == pytest.approx(r["one_by_one_s"] / r["batched_s"], rel=1e-3)


def test_training_overlap_counts_the_pairs_a_run_trained_on(tmp_path):
    """A run folder's config.yaml names its data and the split it held out: the held-out pairs overlap nothing, the
    others all count (whitespace aside); a folder whose data is gone, or no run's, says nothing (None)."""
    import yaml

    from jaxtune.evaluate import training_overlap
    from jaxtune.runs import split_validation

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"data": str(data), "validation_fraction": 0.5, "validation_data": None, "train": {"seed": 1}}))
    trained, held = split_validation(PAIRS, 0.5, 1)
    assert training_overlap(tmp_path / "run", held) == 0
    assert training_overlap(tmp_path / "run", PAIRS) == len(trained) == 3
    spaced = [Pair(p.instruction + "  ", " " + p.response) for p in trained]
    assert training_overlap(tmp_path / "run", spaced) == 3
    data.unlink()
    assert training_overlap(tmp_path / "run", PAIRS) is None and training_overlap(tmp_path, PAIRS) is None


def test_eval_without_data_scores_the_pairs_the_run_held_out(models, tmp_path, capsys):
    """`eval --model RUN` with no --data answers the validation split RUN held out (its config.yaml's data, fraction
    and seed), or its --validation-data; a run that held nothing out, or whose file is gone, asks for --data."""
    import shutil

    import yaml

    from jaxtune.runs import split_validation

    _, base, _ = models
    run = tmp_path / "run"
    shutil.copytree(base, run)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    cfg = {"data": str(data), "validation_fraction": 0.5, "validation_data": None, "train": {"seed": 1}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    held = split_validation(PAIRS, 0.5, 1)[1]
    assert main(["eval", "--model", str(run), "--max-new-tokens", "2"]) == 0
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [p.instruction for p in held] and len(held) == 3
    (summary,) = json.loads((run / "eval.json").read_text())["models"]
    assert summary["examples"] == 3 and summary["trained_on"] == 0
    said = "the validation split the run held out: 3 of 6 pairs of pairs.jsonl (fraction 0.5, seed 1)"
    assert f"3 held-out pairs from {said};" in (run / "eval.md").read_text()  # a description, not a file name
    assert f"held-out pairs: {said}" in capsys.readouterr().err  # said before the work begins
    assert f"held-out pairs in {said}, scored" in (run / "README.md").read_text()

    (run / "samples.jsonl").write_text("".join(json.dumps({"instruction": p.instruction, "reference": p.response,
                                                           "generated": "?"}) + "\n" for p in held[:2]))
    assert main(["eval", "--model", str(run), "--max-new-tokens", "2"]) == 0  # the run's own samples: in its split
    edited = [Pair(p.instruction, "Edited since.") if p == held[0] else p for p in PAIRS]
    write_jsonl(data, edited)  # the file the run read, edited after it: its split is no longer the run's
    capsys.readouterr()
    assert main(["eval", "--model", str(run)]) == 2
    assert f"give --data: the pairs {run} held out are not known here: its --data {data} changed since the run" in \
        capsys.readouterr().err
    write_jsonl(data, PAIRS)
    other = write_jsonl(tmp_path / "other.jsonl", PAIRS[:2])  # its --validation-data, known with its data gone too
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "validation_data": str(other),
                                                     "data": str(tmp_path / "moved.jsonl")}))
    assert main(["eval", "--model", str(run), "--max-new-tokens", "2"]) == 0
    assert [json.loads(line)["instruction"] for line in (run / "eval.jsonl").read_text().splitlines()] == [
        p.instruction for p in PAIRS[:2]]
    assert "held-out pairs in `other.jsonl, the run's --validation-data`" not in (run / "README.md").read_text()
    assert "held-out pairs in other.jsonl, the run's --validation-data, scored" in (run / "README.md").read_text()
    assert str(tmp_path) not in (run / "README.md").read_text()  # no local path in a card that may be pushed
    capsys.readouterr()
    for change, message in [({"validation_fraction": 0.0}, f"give --data: {run} held no pairs out"),
                            ({"validation_data": str(tmp_path / "gone.jsonl")}, f"give --data: the pairs {run} held "
                             f"out are not known here: its --validation-data {tmp_path / 'gone.jsonl'} is not a file"),
                            ({"data": str(tmp_path / "moved.jsonl")}, f"give --data: the pairs {run} held out are not "
                             f"known here: its --data {tmp_path / 'moved.jsonl'} is not a file on this machine")]:
        (run / "config.yaml").write_text(yaml.safe_dump({**cfg, **change}))
        assert main(["eval", "--model", str(run)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "loss on" not in err
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", "--model", str(base), "--compare", str(run)]) == 2  # the run second: said how to put it first
    assert f"give --data: {base} is not a jaxtune run folder (it has no readable config.yaml), so the pairs it held " \
        f"out are not known; or name the run first (--model {run})" in capsys.readouterr().err


def test_the_cards_evaluation_is_eval_mds_table_with_its_warning_and_no_paths(tmp_path):
    """The card's evaluation section has eval.md's columns, headers and figures, each model named once without a
    local path (two folders named merged, a model given twice), and eval.md's warning for a model that trained on
    the pairs, which then are not called held-out anywhere."""
    from jaxtune.evaluate import ModelEval, write_reports

    run = save(build(GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=4), seed=0), load("tiny")[1],
               tmp_path / "run")
    for folder in ("a/merged", "b/merged", "rv"):
        (tmp_path / folder).mkdir(parents=True)
    scores = dict(source="x", examples=4, val_loss=10.70, perplexity=44410.9848, rouge_l=0.5, exact_match=0.25,
                  stop_rate=1.0, mean_tokens=12.0, seconds=1.0)
    labels = [str(run), str(tmp_path / "a/merged"), str(tmp_path / "b/merged"), str(tmp_path / "rv"),
              f"{tmp_path / 'rv'} (2)"]
    results = [ModelEval(model=label, trained_on=4 if label == str(run) else None, **scores,
                         answers=[{"answer": "a", "rouge_l": 0.5, "exact": False, "stopped": True, "tokens": 1}] * 4)
               for label in labels]
    pairs = PAIRS[:4]
    write_reports(results, pairs, run, data=str(write_jsonl(tmp_path / "held.jsonl", pairs)), max_new_tokens=8)
    card, report = (run / "README.md").read_text(), (run / "eval.md").read_text()
    header = "| model | val loss | perplexity | ROUGE-L | exact | stop rate | mean tokens |"
    assert header in card and header in report
    figures = " | 10.7000 | 4.441e+04 | 0.500 | 0.250 | 1.000 | 12.0 |"
    assert f"| {run}{figures}" in report
    for name in ("this model", "a/merged", "b/merged", "rv", "rv (2)"):
        assert card.count(f"| {name}{figures}") == 1
    assert str(tmp_path) not in card
    assert "**Warning:** this model trained on 4 of these 4 pairs: its scores on them are not held-out." in card
    assert f"**Warning:** {run} trained on 4 of these 4 pairs" in report
    assert "Greedy answers of at most 8 new tokens to the pairs in `held.jsonl`" in card and "4 pairs from `" in report
    assert "held-out pairs" not in card and "held-out pairs" not in report

    broken = ModelEval(model="broken", **{**scores, "val_loss": float("nan"), "perplexity": float("inf")},
                       answers=results[0].answers)  # a model whose weights hold NaN
    write_reports([broken, results[0]], pairs, tmp_path / "out", data="held.jsonl", max_new_tokens=8)
    summary = json.loads((tmp_path / "out" / "eval.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"eval.json holds {c}, which is not JSON"))
    assert summary["models"][0]["val_loss"] is None and summary["models"][0]["not_finite"] == ["val_loss", "perplexity"]
    report = (tmp_path / "out" / "eval.md").read_text()
    assert "not held-out.\n\n**Warning:** broken's val loss and perplexity came out as no finite number: its weights " \
        "may hold NaN or infinity.\n" in report  # each warning its own paragraph
