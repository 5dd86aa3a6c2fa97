"""The command line end to end, in a subprocess, and its errors."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [{"instruction": f"Where is order {n}?", "response": f"Order {n} is on its way."} for n in range(12)]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "jaxtune", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_notes_a_cut_answer_only_when_it_was_cut(tmp_path):
    """The note on the model's positions came after every answer to a large --max-new-tokens, also one the model
    ended itself at EOS long before."""
    from jaxtune.checkpoint import EMBEDDED, load, save

    model, tok = load(EMBEDDED)
    model.ln_f.scale[...] = 0 * model.ln_f.scale[...]  # every position's last hidden state is EOS's embedding:
    model.ln_f.bias[...] = 10 * model.wte.embedding[...][tok.eos_token_id]  # the model says EOS at once
    save(model, tok, tmp_path / "stops")
    g = run("generate", "--model", str(tmp_path / "stops"), "--instruction", "word " * 240, "--max-new-tokens", "64")
    assert g.returncode == 0 and g.stdout.strip() == "" and "note:" not in g.stderr, g.stderr


def test_a_row_left_out_for_its_length_is_no_sample_and_the_run_keeps_its_model(tmp_path):
    """A row whose instruction the model cannot read was left out of training but taken as a sample: answering it
    failed after the last step, and the run ended with no model."""
    rows = [{"instruction": "word " * 300, "response": "ok"}] + PAIRS[:5]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    p = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "1",
            "--max-length", "48", "--samples", "2")
    assert p.returncode == 0 and "d.jsonl line 1: nothing of the response fits" in p.stderr, p.stderr[-2000:]
    assert (tmp_path / "run" / "model.safetensors").exists()
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [x["instruction"] for x in samples] == [r["instruction"] for r in PAIRS[:2]]


def test_train_then_generate(tmp_path):
    """A short run on a slice of the bundled help-desk data, then `generate` with the result."""
    examples = [json.loads(x) for x in (ROOT / "examples" / "customer_service.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp_path / "train.jsonl", examples[:12])
    val = write_jsonl(tmp_path / "val.jsonl", examples[12:15])
    out = tmp_path / "run"
    p = run("train", "--model", "tiny", "--data", str(data), "--validation-data", str(val), "--output", str(out),
            "--epochs", "4", "--batch-size", "4", "--learning-rate", "3e-3", "--max-length", "48", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert "12 steps" in p.stdout and "validation loss" in p.stdout and str(out) in p.stdout
    assert "embedded offline model" in p.stderr
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "metrics.jsonl",
            "samples.jsonl", "config.yaml"} <= files
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["instruction"] for s in samples] == [r["instruction"] for r in examples[12:15]]
    assert all(set(s) == {"instruction", "reference", "generated"} for s in samples)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[-1]["val_loss"] is not None and "perplexity" in p.stdout
    assert abs(metrics[-1]["val_perplexity"] - np.exp(metrics[-1]["val_loss"])) < 1e-6 * metrics[-1]["val_perplexity"]
    pt = transformers.GPT2LMHeadModel.from_pretrained(out)  # the output is a Hugging Face directory
    assert pt.config.n_layer == 2
    g = run("generate", "--model", str(out), "--instruction", examples[0]["instruction"], "--max-new-tokens", "12")
    assert g.returncode == 0, g.stderr and g.stdout.strip()
    assert g.stdout.strip() and "note:" not in g.stderr
    g = run("generate", "--model", "tiny", "--instruction", "word " * 240, "--max-new-tokens", "64")  # random: no EOS
    assert g.returncode == 0 and re.search(r"note: the model reads 256 positions and the prompt took 24\d, so the "
                                           r"answer had room for \d+ of the 64 new tokens asked", g.stderr), g.stderr


@pytest.mark.parametrize("content, message", [
    (b'{"instruction": "a", "response": "b"}\nnot json\n', "line 2: not valid JSON"),
    (b'{"instruction": "a"}\n', "line 1: no response field"),
    (b'{"instruction": "caf\xe9", "response": "b"}\n', "line 1 is not UTF-8"),
    (b'{"instruction": "", "response": "b"}\n', "field 'instruction' is empty"),
])
def test_bad_data_is_reported_and_nothing_is_written(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_bytes(content)
    p = run("train", "--model", "tiny", "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "out"))
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.jsonl"]


def test_unknown_model_and_existing_output(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS[:2])
    p = run("train", "--model", "nobody/nothing", "--data", str(data), "--output", str(tmp_path / "out"))
    assert p.returncode == 2 and "'nobody/nothing': no folder nobody/nothing here, and not in the local Hugging Face " \
        "cache" in p.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    p = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "full"))
    assert p.returncode == 2 and "jaxtune did not write (keep.txt)" in p.stderr and "--subfolder" in p.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    p = run("generate", "--model", str(tmp_path / "absent"), "--instruction", "hi")
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_quickstart_prints_the_reference_loss_then_falling_losses():
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # as the README runs it, from the clone with nothing on the path
    env.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "examples/quickstart.py", "--steps", "15"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("Loss: ") and 10.0 < float(lines[0].split()[1]) < 11.5  # random init: about ln(50257)
    losses = [float(line.split("Loss: ")[1]) for line in lines if line.startswith("step")]
    assert len(losses) == 15 and losses[-1] < losses[0] - 3.0
    assert "'Answer politely' -> 'Of course, how may I assist you?'" in p.stdout


def test_yaml_config_round_trip_repeats_the_run(tmp_path):
    """The effective config.yaml, passed back with --config, gives the same run; flags override the file."""
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\ndata: {data}\nvalidation_fraction: 0.25\nsamples: 2\n"
                      "train:\n  epochs: 2\n  batch_size: 4\n  learning_rate: 0.003\n  max_length: 48\n  seed: 7\n")
    first = run("train", "--config", str(config), "--output", str(tmp_path / "a"), "--epochs", "3")
    assert first.returncode == 0, first.stderr
    assert "9 pairs" in first.stderr and "3 validation pairs" in first.stderr  # 12 pairs, a quarter held out
    import yaml

    effective = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert effective["train"]["epochs"] == 3 and effective["train"]["seed"] == 7  # the flag won, the file held
    assert effective["output"] == str(tmp_path / "a")
    again = run("train", "--config", str(tmp_path / "a" / "config.yaml"), "--output", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("a") == losses("b") and len(losses("a")) == 9
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()


def test_config_and_strict_errors(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS[:3] + PAIRS[:1] + [{"instruction": "x", "response": "word " * 80}])
    p = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "o"), "--max-length", "32",
            "--epochs", "4")
    assert p.returncode == 0, p.stderr
    assert "warning: d.jsonl line 4: duplicate of d.jsonl line 1" in p.stderr
    assert "warning: d.jsonl line 5: longer than 32 tokens" in p.stderr
    assert "note: tiny starts from random weights, and a learning rate of 5e-05 barely moves it" in p.stderr
    assert ("note: the warmup of 10 steps is not shorter than the run's 4 steps: the learning rate rises over 3 of "
            "them and reaches 5e-05 only at the last") in p.stderr  # (the schedule cuts it to the run)
    p = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "s"), "--strict")
    assert p.returncode == 2 and "--strict" in p.stderr and not (tmp_path / "s").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ntrain:\n  epoch: 3\n")
    p = run("train", "--config", str(bad), "--data", str(data), "--output", str(tmp_path / "x"))
    assert p.returncode == 2 and "unknown option(s) train.epoch (train.epoch: did you mean train.epochs?)" in p.stderr
    p = run("train", "--model", "tiny", "--output", str(tmp_path / "x"))
    assert p.returncode == 2 and "--data is required" in p.stderr


def test_a_resume_or_config_that_is_not_there_says_what_it_is(tmp_path, capsys):
    """In this process (nothing loads before these are refused): a --resume folder that does not exist or is a file
    is said as such, not as a run without checkpoints; a YAML syntax error names its file, line and column."""
    from jaxtune.cli import main

    (tmp_path / "a.txt").write_text("notes")
    (tmp_path / "empty").mkdir()
    for given, said in (("nope", "no such folder"), ("a.txt", "a file, not a run's folder"),
                        ("empty", "no jaxtune run there")):
        assert main(["train", "--resume", str(tmp_path / given)]) == 2
        err = capsys.readouterr().err
        assert f"--resume {tmp_path / given}: {said}" in err and "; give the --output folder of a run" in err, err
    for flags, said in ((["--max-new-tokens", "0"], "--max-new-tokens 0 is out of range"),  # printed nothing
                        (["--temperature", "-0.5"], "--temperature -0.5 must be a finite number of at least 0")):
        # generate's settings are checked before the model (here none) is loaded
        assert main(["generate", "--model", str(tmp_path / "nope"), "--instruction", "Hi", *flags]) == 2
        err = capsys.readouterr().err
        assert said in err and "nope" not in err, err
    (tmp_path / "broken.yaml").write_text("model: tiny\ntrain:\n  epochs: [3\n")
    assert main(["train", "--config", str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert f'in "{tmp_path / "broken.yaml"}", line' in err and "<unicode string>" not in err, err


def test_config_mistakes_say_what_was_meant():
    """YAML reads 5e-3 as text: it is taken as the number; an option in the wrong place or misspelt is named with
    where it goes; a list where one path goes is refused as such."""
    from jaxtune.config import RunConfig

    assert RunConfig.from_dict({"train": {"learning_rate": "5e-3"}}).train.learning_rate == 0.005
    for values, message in [({"learning_rate": 1e-3}, "learning_rate goes under train:"),
                            ({"train": {"output": "x"}}, "train.output goes at the top level, not under train:"),
                            ({"lerning_rate": 1e-3}, "lerning_rate: did you mean train.learning_rate?"),
                            ({"data": ["a.jsonl", "b.jsonl"]}, "data=['a.jsonl', 'b.jsonl'] must be one path or name"),
                            ({"train": {"learning_rate": "fast"}}, "learning_rate='fast' must be a number, like 0.005"),
                            ({"merge": True}, "merge applies to LoRA runs: set lora_rank"),
                            ({"train": {"lora_alpha": 8}}, "lora_alpha applies to LoRA runs: set lora_rank"),
                            ({"validation_data": "v.jsonl", "validation_fraction": 0.2},
                             "validation_data (--validation-data) and validation_fraction (--validation-fraction) "
                             "both pick the held-out pairs: give one"),
                            ({"early_stopping": 3}, "early_stopping watches the validation loss: give held-out pairs"),
                            ({"early_stopping": 0, "validation_fraction": 0.2}, "early_stopping=0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            RunConfig.from_dict(values)


def test_shipped_configs_parse():
    import yaml

    from jaxtune.config import RunConfig

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = RunConfig.from_dict(yaml.safe_load(f.read_text()), source=str(f))
        assert (ROOT / cfg.data).exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    import signal
    import time

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    common = ["--model", "tiny", "--data", str(data), "--epochs", "15", "--batch-size", "4", "--learning-rate", "3e-3",
              "--max-length", "48", "--seed", "2"]
    full = run("train", *common, "--output", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "jaxtune", "train", *common, "--output", str(tmp_path / "cut"),
                             "--save-every", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "3").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: finish the step, checkpoint, export, exit cleanly
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err  # saved, but stopped: a script's `train && deploy` stops too
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert 3 <= len(cut) < 45
    resumed = run("train", "--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'cut'} at step {len(cut)}/45" in resumed.stderr
    losses = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("cut") == losses("full") and len(losses("full")) == 45
    assert (tmp_path / "cut" / "model.safetensors").exists() and (tmp_path / "cut" / "checkpoints").is_dir()
    card = (tmp_path / "cut" / "README.md").read_text()  # the resume is recorded, and changed nothing
    assert f"| resumed | at step {len(cut)} |" in card and "repeats it (add" in card


@pytest.mark.parametrize("later", [0, 400, 1000])
def test_ctrl_c_while_jax_is_imported_ends_with_a_line_not_a_traceback(later):
    """The first seconds of every command import JAX; a Ctrl-C then printed Python's traceback of the import, or was
    lost in a garbage-collection callback of JAX's and the command ran on. Sent at a module `later` imports after
    jaxlib's first (of about 1,500), it ends the command at once."""
    import signal
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "jaxtune", "train", "--help"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not re.search(r"\|\s+jaxlib", line := proc.stderr.readline()):  # -X importtime: a line a module
        assert line and time.time() < deadline, "jaxtune's imports ended before jaxlib was imported"
    for _ in range(later):
        assert proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "\naborted by Ctrl-C\n" in err and "Traceback" not in err, err
    assert "usage:" not in out  # it stopped in the imports, before the command ran


def test_arguments_that_are_not_utf8_are_refused_before_anything_runs(tmp_path):
    """Bytes that are not UTF-8 (a terminal in another encoding) used to crash the tokenizer, or to train a whole run
    and then fail to write it into a folder of that name."""
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = os.fsencode(tmp_path) + b"/out\xffdir"
    p = subprocess.run([sys.executable, "-m", "jaxtune", "train", "--model", "tiny", "--data", str(data), "--output",
                        out], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "out\\xffdir' holds bytes that are not valid UTF-8; retype it" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == [data] and "step" not in p.stderr  # refused before anything was made


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature nan must be a finite number"),
    (["--top-p", "1.5"], "--top-p 1.5 must be above 0 and at most 1"),
    (["--seed", str(2**70)], "--seed 1,180,591,620,717,411,303,424 is out of range"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3 is out of range"),
    (["--top-k", "-1"], "--top-k -1 is out of range"),
])
def test_generate_refuses_bad_sampling_values(flags, message):
    p = run("generate", "--model", "tiny", "--instruction", "hi", *flags)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_bad_option_values_are_refused_with_what_and_where(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    for flags, message in ((["--seed", str(2**70)], "--seed 1,180,591,620,717,411,303,424 is out of range"),
                           (["--epochs", str(10**9)], "--epochs 1,000,000,000 is out of range"),
                           (["--validation-fraction", "nan"], "--validation-fraction nan must be a finite number"),
                           (["--keep-checkpoints", "0"], "--keep-checkpoints 0 is out of range")):
        p = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "o"), *flags)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ntrain: [1, 2]\n")
    p = run("train", "--config", str(bad), "--data", str(data), "--output", str(tmp_path / "o"))
    assert p.returncode == 2 and "'train' a mapping" in p.stderr and "Traceback" not in p.stderr
    bad.write_text("model: tiny\ntrain:\n  epochs: three\n")
    p = run("train", "--config", str(bad), "--data", str(data), "--output", str(tmp_path / "o"))
    assert p.returncode == 2 and "epochs='three' must be a whole number" in p.stderr
    assert not (tmp_path / "o").exists()


def test_compiled_programs_are_cached_between_launches(tmp_path):
    """The persistent compilation cache fills on the first launch and serves the second (JAX counts its hits; the
    losses are the same); set to 0 it is off. (How much time it saves is the benchmark's to measure.)"""
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    argv = ["train", "--model", "tiny", "--data", str(data), "--epochs", "1", "--batch-size", "4", "--max-length", "48"]
    code = ("import sys, jax; hits = []; jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) "
            "if e == '/jax/compilation_cache/cache_hits' else None); from jaxtune.cli import main; "
            "rc = main(sys.argv[1:]); print('cache hits', len(hits)); sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", JAXTUNE_COMPILATION_CACHE=str(tmp_path / "xla"))

    def launch(out, env):
        p = subprocess.run([sys.executable, "-c", code, *argv, "--output", str(tmp_path / out)], capture_output=True,
                           text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr
        return int(p.stdout.split("cache hits ")[1])

    assert launch("r1", env) == 0 and any((tmp_path / "xla").iterdir())
    assert launch("r2", env) >= 1  # the train step (and the rest) came from the cache
    loss = lambda d: [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss("r1") == loss("r2")
    off = dict(env, JAXTUNE_COMPILATION_CACHE="0", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert launch("r3", off) == 0 and not (tmp_path / "xdg").exists()


def test_push_uploads_a_lora_run_its_merged_model_or_says_why_not(tmp_path):
    """`python -m jaxtune push`, against a local stand-in for the hub's upload routes (tests/hub_standin.py, at
    HF_ENDPOINT): a LoRA run on the embedded model goes up as its adapter with the base beside it, then as the model
    merged now, which transformers loads and which answers with jaxtune's logits; a refused token, a full model with
    --merged and no token at all are each one line that says what to do."""
    import torch
    from hub_standin import GOOD_TOKEN, HubStandIn

    from jaxtune import load

    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    trained = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "lora"), "--epochs", "1",
                  "--lora-rank", "4", "--max-length", "48", "--learning-rate", "1e-2")
    assert trained.returncode == 0, trained.stderr
    hub = HubStandIn()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"),
               HF_TOKEN=GOOD_TOKEN)

    def push(*args, **extra):
        return subprocess.run([sys.executable, "-m", "jaxtune", "push", str(tmp_path / "lora"), *args],
                              env={**env, **extra}, capture_output=True, text=True, timeout=300)

    try:
        p = push("--repo", "me/adapter")
        assert p.returncode == 0 and f"uploaded the LoRA adapter in {tmp_path / 'lora'} to {hub.url}/me/adapter" \
            in p.stdout, p.stderr
        files = hub.repos["me/adapter"]["files"]
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "config.yaml",
                "base/model.safetensors"} <= set(files) and hub.repos["me/adapter"]["private"] is True
        assert not any(f.startswith(("checkpoints", "merged")) or f in ("train.log", "data.jsonl", "samples.jsonl")
                       for f in files)  # nor the pairs, nor the answers to them
        assert 'GPT2LMHeadModel.from_pretrained(path, subfolder="base")' in files["README.md"].decode()
        p = push("--repo", "me/merged", "--merged", "--public")
        assert p.returncode == 0 and "uploaded the merged model" in p.stdout, p.stderr
        files = hub.repos["me/merged"]["files"]
        assert "adapter_config.json" not in files and hub.repos["me/merged"]["private"] is False
        assert yaml.safe_load(files["config.yaml"])["train"]["lora_rank"] == 4  # the run's, as the card says
        assert files["metrics.jsonl"] == (tmp_path / "lora" / "metrics.jsonl").read_bytes()  # and its losses
        (tmp_path / "got").mkdir()
        for name, content in files.items():
            (tmp_path / "got" / name).write_bytes(content)
        ids = [[15496, 995, 318, 257]]
        theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "got")(torch.tensor(ids)).logits
        ours = load(str(tmp_path / "lora"))[0](np.asarray(ids))  # the adapter on its base, in jaxtune
        assert np.abs(theirs.detach().numpy() - np.asarray(ours)).max() < 1e-4
        assert "| final training loss |" in files["README.md"].decode()  # the card tells how it was trained

        p = push("--repo", "me/other", HF_TOKEN="hf_wrong")
        assert p.returncode == 2 and "upload to me/other failed: the token was not accepted" in p.stderr, p.stderr
        p = push("--repo", "me/other", HF_TOKEN="")
        assert p.returncode == 2 and "no Hugging Face token: run `hf auth login`, set HF_TOKEN" in p.stderr, p.stderr
        p = subprocess.run([sys.executable, "-m", "jaxtune", "push", str(tmp_path / "lora" / "base"), "--repo", "me/x",
                            "--merged"], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "--merged is for a LoRA run" in p.stderr and "Traceback" not in p.stderr
        (tmp_path / "unfinished").mkdir()  # a run killed before it wrote a model
        p = subprocess.run([sys.executable, "-m", "jaxtune", "push", str(tmp_path / "unfinished"), "--repo", "me/x",
                            "--merged"], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and "unfinished holds no model yet" in p.stderr, p.stderr
        assert "me/other" not in hub.repos and "me/x" not in hub.repos
    finally:
        hub.close()
