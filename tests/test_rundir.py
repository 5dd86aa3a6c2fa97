"""Run directories through the real command line: jaxtune deletes only what it wrote, a resume continues only the
run it was given, damaged checkpoints are skipped, a full disk loses nothing, non-finite training writes nothing
non-finite."""

import json
import re
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_cli import PAIRS, run, write_jsonl

COMMON = ["--epochs", "2", "--batch-size", "4", "--learning-rate", "3e-3", "--max-length", "48", "--seed", "2"]


def train(hf_dir, data, out, *extra):
    return run("train", "--model", str(hf_dir), "--data", str(data), "--output", str(out), *COMMON, *extra)


def losses(directory):
    return [json.loads(x)["loss"] for x in (Path(directory) / "metrics.jsonl").read_text().splitlines()]


def test_runs_never_delete_or_write_among_files_jaxtune_did_not_write(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    first = train(hf_dir, data, tmp_path / "run", "--save-every", "2")
    assert first.returncode == 0, first.stderr
    owned = json.loads((tmp_path / "run" / ".jaxtune-run.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "metrics.jsonl", "checkpoints"} <= set(owned)
    thesis = tmp_path / "run" / "thesis.txt"
    thesis.write_text("four years of work")
    for args in (["--resume", str(tmp_path / "run")], ["--overwrite"]):  # in place, with a stranger in the folder
        p = run("train", *args, "--output", str(tmp_path / "run"), "--model", str(hf_dir), "--data", str(data), *COMMON)
        assert p.returncode == 2 and "holds files jaxtune did not write (thesis.txt)" in p.stderr, p.stderr
        assert thesis.read_text() == "four years of work" and (tmp_path / "run" / "model.safetensors").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    p = run("train", "--resume", str(tmp_path / "run"), "--output", str(other))
    assert p.returncode == 2 and "notes.md" in p.stderr and sorted(x.name for x in other.iterdir()) == ["notes.md"]
    p = train(hf_dir, data, other, "--subfolder")  # told to: the run goes into a new folder inside
    assert p.returncode == 0, p.stderr
    inside = [x for x in other.iterdir() if x.is_dir()]
    assert len(inside) == 1 and inside[0].name.startswith("run-") and (inside[0] / "model.safetensors").exists()
    assert (other / "notes.md").read_text() == "mine"
    thesis.unlink()
    p = train(hf_dir, data, tmp_path / "run")  # a jaxtune run, and no --overwrite: refused, and it says how
    assert p.returncode == 2 and "--resume" in p.stderr and "--overwrite" in p.stderr
    before = sorted(x.name for x in (tmp_path / "run").iterdir())
    for mistake, said in ((["--data", str(tmp_path / "missing.jsonl")], "no such file"),
                          (["--model", "no-such-model"], "no-such-model")):
        p = train(hf_dir, data, tmp_path / "run", "--overwrite", *mistake)  # a mistake found before training: the
        assert p.returncode == 2 and said in p.stderr, p.stderr  # run it would have replaced stays whole (it was wiped)
        assert sorted(x.name for x in (tmp_path / "run").iterdir()) == before
    p = train(tmp_path / "run", data, tmp_path / "run", "--overwrite")  # it would delete the model it trains
    assert p.returncode == 2 and f"--model {tmp_path / 'run'} is inside --output {tmp_path / 'run'}, which " \
        "--overwrite replaces" in p.stderr, p.stderr
    p = train(hf_dir, tmp_path / "run" / "metrics.jsonl", tmp_path / "run", "--overwrite")  # its data too
    assert p.returncode == 2 and "--data" in p.stderr and "Copy it out of" in p.stderr, p.stderr
    assert sorted(x.name for x in (tmp_path / "run").iterdir()) == before
    p = train(hf_dir, data, tmp_path / "run", "--overwrite", "--epochs", "1")
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and len(losses(tmp_path / "run")) == 3  # the old run's are gone
    p = train(hf_dir, data, tmp_path / "run")  # a run without checkpoints: no --resume to suggest
    assert p.returncode == 2 and "with no checkpoint to resume from" in p.stderr and "--resume" not in p.stderr
    p = run("train", "--resume", str(tmp_path / "run"))
    assert p.returncode == 2 and "no checkpoint there to resume from" in p.stderr and "--config" not in p.stderr
    (tmp_path / "run" / "checkpoints").mkdir()  # as a second Ctrl-C leaves it: the run's options, no step saved
    shutil.copy(tmp_path / "run" / "config.yaml", tmp_path / "run" / "checkpoints" / "config.yaml")
    from jaxtune.rundir import claim

    claim(tmp_path / "run", ["checkpoints"])  # jaxtune's, as the run records it
    p = train(hf_dir, data, tmp_path / "run")  # it offered --resume, which then failed after loading everything
    assert p.returncode == 2 and "with no checkpoint to resume from" in p.stderr and "--resume" not in p.stderr
    p = run("train", "--resume", str(tmp_path / "run"))
    assert p.returncode == 2 and "the run saved no checkpoint to resume from" in p.stderr and \
        f"--output {tmp_path / 'run'} --overwrite" in p.stderr and "model:" not in p.stderr, p.stderr
    p = run("train", "--resume", str(other))  # a folder of the user's: no run at all
    assert p.returncode == 2 and f"--resume {other}: no jaxtune run there; give the --output folder" in p.stderr
    p = train(hf_dir, data, tmp_path / "d.jsonl" / "run")  # a file in the path: said in a line, no traceback
    assert p.returncode == 2 and f"{tmp_path / 'd.jsonl'} is a file, not a folder; give a directory path" in p.stderr
    assert "data:" not in p.stderr  # said before the data and the model were read
    assert "Traceback" not in p.stderr


def test_resume_refuses_other_options_or_data_and_accepts_more_steps(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    p = train(hf_dir, data, tmp_path / "run", "--save-every", "2", "--max-steps", "4")
    assert p.returncode == 0, p.stderr
    resume = ["train", "--resume", str(tmp_path / "run")]
    for flags, diff in ((["--max-length", "32"], "max_length: 48 -> 32"), (["--seed", "3"], "seed: 2 -> 3"),
                        (["--pack"], "pack: False -> True"), (["--batch-size", "2"], "batch_size: 4 -> 2")):
        p = run(*resume, *flags)
        assert p.returncode == 2 and diff in p.stderr and "differ from the stopped run" in p.stderr, p.stderr
    changed = write_jsonl(tmp_path / "changed.jsonl", PAIRS[:-1] + [{"instruction": "New?", "response": "Yes."}])
    p = run(*resume, "--data", str(changed))
    assert p.returncode == 2 and "the training data differ from the stopped run's" in p.stderr, p.stderr
    moved = tmp_path / "moved.jsonl"
    shutil.copy(data, moved)  # the same pairs under another name: the content is what counts
    p = run(*resume, "--data", str(moved), "--max-steps", "6", "--learning-rate", "1e-3", "--eval-every", "3")
    assert p.returncode == 0, p.stderr
    assert "from step 5 on: " in p.stderr and "learning_rate: 0.003 -> 0.001; max_steps: 4 -> 6" in p.stderr
    assert "eval_every: none -> 3" in p.stderr  # what changed is said, when validation loss is measured too
    # the schedule spans the new plan (still warming up at step 5), said beside the old (ended: a tenth of the peak)
    assert "note: the run now plans 6 steps, not 4: its learning-rate schedule is recomputed over them, so step 5 " \
        "takes 0.0008 where the old plan gave 0.0001" in p.stderr, p.stderr
    assert abs(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[4])["learning_rate"] -
               0.0008) < 1e-9
    assert "at step 4/6" in p.stderr, p.stderr[-3000:]  # the finished run's last step was kept: nothing recomputed
    assert len(losses(tmp_path / "run")) == 6
    p = run(*resume)  # a run that has run all its steps
    assert p.returncode == 0 and "no step left to run (the checkpoint holds step 6, the last)" in p.stdout, p.stdout
    kept = {name: (tmp_path / "run" / name).read_text() for name in ("config.yaml", "README.md")}
    p = run(*resume, "--learning-rate", "1e-4")  # a new rate for no step: it was recorded as the run's
    assert p.returncode == 2 and "the run has no step left to run (the checkpoint holds step 6), so learning_rate: " \
        "0.001 -> 0.0001 would apply to no step" in p.stderr, p.stderr
    assert {name: (tmp_path / "run" / name).read_text() for name in kept} == kept
    p = run(*resume, "--max-steps", "3")  # fewer steps than the checkpoint holds
    assert p.returncode == 2 and "the checkpoint is at step 6, past the 3 steps these options plan; give options " \
        "that plan at least 6 steps" in p.stderr, p.stderr
    p = run(*resume, "--max-steps", "50", "--epochs", "3")  # more than 3 epochs plan: capped, and now said
    assert p.returncode == 0 and "note: --max-steps 50 is more than the 9 steps 3 epochs plan, so the run ends at " \
        "step 9; raise --epochs to train longer" in p.stderr, p.stderr


def test_a_run_on_relative_paths_resumes_from_any_folder(tmp_path, hf_dir):
    """config.yaml names the data and a local model by absolute paths, and the validation file is compared by its
    content: a resume from another folder, naming that file another way, continues the run, and the LoRA adapter
    names its base so that it loads from anywhere (and, its base moved, says to pass --base)."""
    import yaml

    write_jsonl(tmp_path / "d.jsonl", PAIRS)
    write_jsonl(tmp_path / "v.jsonl", PAIRS[:3])
    shutil.copytree(hf_dir, tmp_path / "mybase")
    p = run("train", "--model", "mybase", "--data", "d.jsonl", "--validation-data", "v.jsonl", "--output", "run",
            *COMMON, "--save-every", "2", "--max-steps", "2", "--lora-rank", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["data"], saved["validation_data"]) == (str(tmp_path / "d.jsonl"), str(tmp_path / "v.jsonl"))
    assert saved["model"] == str(tmp_path / "mybase")
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "mybase")
    p = run("train", "--resume", str(tmp_path / "run"), "--max-steps", "4", "--validation-data",
            f"{tmp_path}/./v.jsonl")  # run from the repository's folder
    assert p.returncode == 0 and "at step 2/4" in p.stderr, p.stderr[-2000:]
    (tmp_path / "mybase").rename(tmp_path / "moved")
    p = run("generate", "--model", str(tmp_path / "run"), "--instruction", "Hi", "--max-new-tokens", "2")
    assert p.returncode == 2 and "if it is elsewhere now, pass it with --base DIR" in p.stderr, p.stderr
    from jaxtune.checkpoint import ModelLoadError, load
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelLoadError) as wrong:  # a base the user gave that is no model: said as theirs
        load(str(tmp_path / "run"), base=str(tmp_path / "notes"))
    assert f"{tmp_path / 'notes'}: no config.json" in str(wrong.value) and "It was given as the base of the " \
        "adapter" in str(wrong.value) and "names" not in str(wrong.value), str(wrong.value)
    p = run("generate", "--model", str(tmp_path / "run"), "--base", str(tmp_path / "moved"), "--instruction", "Hi",
            "--max-new-tokens", "2")
    assert p.returncode == 0, p.stderr
    p = run("eval", "--model", str(tmp_path / "run"), "--compare", str(tmp_path / "moved"), "--base",
            str(tmp_path / "moved"), "--data", str(tmp_path / "v.jsonl"), "--max-new-tokens", "2")
    assert p.returncode == 0 and "run" in p.stdout and "moved" in p.stdout, p.stderr  # --base: the adapter only
    p = run("train", "--resume", str(tmp_path / "run"), "--max-steps", "5")  # the base it names is gone
    assert p.returncode == 2 and f"the run's model folder {tmp_path / 'mybase'} is gone; if it moved, give its new " \
        "place with --model DIR" in p.stderr, p.stderr
    assert {"eval.json", "eval.jsonl", "eval.md"} <= {x.name for x in (tmp_path / "run").iterdir()}  # in the run
    p = run("train", "--resume", str(tmp_path / "run"), "--max-steps", "5", "--model", str(tmp_path / "moved"))
    assert p.returncode == 0 and "at step 4/5" in p.stderr and "in its place, which must hold the same weights" in \
        p.stderr, p.stderr[-2000:]
    assert f"eval.json, eval.jsonl, eval.md went with the model they evaluated: run python -m jaxtune eval on " \
        f"{tmp_path / 'run'} again" in p.stderr, p.stderr[-2000:]  # the reports were removed without a word
    assert not (tmp_path / "run" / "eval.md").exists()
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "moved")  # the adapter names where its base is now


def _corrupt(step_dir: Path):
    biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:  # 8 bytes of 0xFF in the middle of the largest data file
        f.seek(biggest.stat().st_size // 2)
        f.write(b"\xff" * 8)


def test_damaged_checkpoints_are_skipped_for_the_previous_one(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    full = train(hf_dir, data, tmp_path / "full", "--epochs", "3")
    assert full.returncode == 0, full.stderr
    p = train(hf_dir, data, tmp_path / "run", "--epochs", "3", "--save-every", "2")
    assert p.returncode == 0, p.stderr
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(x.name for x in ck.iterdir() if x.is_dir()) == ["6", "8", "9"]  # the newest three, the last step's
    _corrupt(ck / "9")
    (ck / "8" / "state" / "manifest.ocdbt").write_bytes((ck / "8" / "state" / "manifest.ocdbt").read_bytes()[:10])
    p = run("train", "--resume", str(tmp_path / "run"), "--save-every", "100")
    assert p.returncode == 0, p.stderr
    assert f"checkpoint {ck / '9'} is not usable: " in p.stderr and "checksum mismatch" in p.stderr
    assert f"checkpoint {ck / '8'} is not usable: " in p.stderr and "manifest.ocdbt is 10 bytes" in p.stderr
    assert "at step 6/9" in p.stderr and "Traceback" not in p.stderr and "Event loop" not in p.stderr
    assert losses(tmp_path / "run") == losses(tmp_path / "full")  # from step 6 on, exactly the uninterrupted run
    for step in (x for x in ck.iterdir() if x.is_dir()):
        _corrupt(step)
    p = run("train", "--resume", str(tmp_path / "run"))
    assert p.returncode == 2 and "no usable checkpoint" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") < 12  # three warnings and one error, no noise


def test_nan_rate_is_refused_and_divergence_writes_the_last_finite_weights(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    for rate in ("nan", "inf", "-1"):
        p = train(hf_dir, data, tmp_path / "nan", "--learning-rate", rate)
        assert p.returncode == 2 and "error: --learning-rate " in p.stderr and "must be a finite number above 0" in p.stderr
        assert not (tmp_path / "nan").exists()
    p = train(hf_dir, data, tmp_path / "big", "--learning-rate", "1e30", "--warmup-steps", "0", "--no-dropout")
    assert p.returncode == 1 and "training diverged at step" in p.stderr, p.stderr
    bad = int(p.stderr.split("training diverged at step ")[1].split(":")[0])
    assert f"keeps the weights of step {bad - 1}" in p.stderr and bad > 1
    q = train(hf_dir, data, tmp_path / "last", "--learning-rate", "1e30", "--warmup-steps", "0", "--no-dropout",
              "--max-steps", str(bad - 1))
    assert q.returncode == 0, q.stderr
    written, last = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "last" / "model.safetensors")
    assert all(np.isfinite(v).all() for v in written.values())
    for name in written:  # what the message says: the weights of the last finite step
        np.testing.assert_array_equal(written[name], last[name], err_msg=name)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_loses_neither_the_model_nor_the_checkpoint(tmp_path, hf_dir, small_disk):
    """The final save fails for lack of space: the folder keeps the previous model and the last checkpoint, and the
    error says how to write the model once there is room."""
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    out = small_disk / "run"
    p = train(hf_dir, data, out, "--save-every", "2", "--max-steps", "3", "--keep-checkpoints", "1")
    assert p.returncode == 0, p.stderr
    before = load_file(out / "model.safetensors")
    free = shutil.disk_usage(small_disk).free
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f:  # leave about half the model's size free
        f.write(b"\0" * (free - (out / "model.safetensors").stat().st_size // 2))
    p = run("train", "--resume", str(out), "--max-steps", "5", "--save-every", "100")
    assert p.returncode == 3 and "could not write the model to" in p.stderr and "No space left" in p.stderr, p.stderr
    assert "the last checkpoint, step 3" in p.stderr and f"--resume {out}" in p.stderr and "Traceback" not in p.stderr
    after = load_file(out / "model.safetensors")
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the previous model, whole
    assert sorted(x.name for x in out.iterdir() if x.name.startswith(".")) == [".jaxtune-run.json"]  # no leftovers
    ballast.unlink()
    p = run("train", "--resume", str(out), "--max-steps", "5", "--save-every", "100")  # as the message said
    assert p.returncode == 0 and "at step 3/5" in p.stderr, p.stderr  # the first run's last step was kept
    assert len(losses(out)) == 5


def test_a_crafted_ownership_record_cannot_reach_outside_its_folder(tmp_path):
    from jaxtune.rundir import MANIFEST, owned, remove_owned

    (tmp_path / "run").mkdir()
    (tmp_path / "victim.txt").write_text("keep me")
    (tmp_path / "run" / "model.safetensors").write_text("x")
    (tmp_path / "run" / MANIFEST).write_text(json.dumps({"files": ["../victim.txt", "..", "/etc", "model.safetensors"]}))
    assert owned(tmp_path / "run") == {"model.safetensors"}
    assert remove_owned(tmp_path / "run") == ["model.safetensors"]
    assert (tmp_path / "victim.txt").read_text() == "keep me"


def test_a_batch_larger_than_the_data_is_cut_to_the_data(tmp_path, hf_dir):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS[:5])
    p = run("train", "--model", str(hf_dir), "--data", str(data), "--output", str(tmp_path / "o"), "--epochs", "1",
            "--batch-size", "65536", "--max-length", "48")
    assert p.returncode == 0 and "batch_size 65536 is more than the 5 training pairs; using 5" in p.stderr, p.stderr
    steps = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and steps[0]["positions"] == 5 * 32  # five rows of the 32-token bucket, no more
    packed = run("train", "--model", str(hf_dir), "--data", str(data), "--output", str(tmp_path / "p"), "--epochs", "1",
                 "--batch-size", "65536", "--max-length", "48", "--pack")
    rows = re.search(r"batch_size 65536 is more than the (\d+) packed rows? the 5 training pairs fill; using \1",
                     packed.stderr)
    assert packed.returncode == 0 and rows, packed.stderr
    steps = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and steps[0]["positions"] == int(rows[1]) * 48  # full rows, no empty ones
    planned = re.search(r"real tokens fill (\d+)% of the computed positions \(packed\)", packed.stderr)[1]
    assert f"({planned}% real tokens" in packed.stdout  # the plan said what the run then computed


def test_a_run_that_failed_before_its_first_step_does_not_block_the_next(tmp_path):
    """Out of memory at the first step left an empty metrics.jsonl, and the next try was refused as 'a jaxtune run'
    unless it passed --overwrite; a run with steps is still refused."""
    from jaxtune.rundir import RunDirError, claim, prepare_output

    out = tmp_path / "run"
    out.mkdir()
    claim(out, ["metrics.jsonl"])
    (out / "metrics.jsonl").write_text("")
    assert prepare_output(out) == out
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 10.8}\n')
    with pytest.raises(RunDirError, match="already holds a jaxtune run, with no checkpoint"):
        prepare_output(out)
