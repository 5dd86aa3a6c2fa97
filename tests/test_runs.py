"""The run registry behind the app, without Gradio: runs outlive requests, wait in order, stop when told (or when a
limit says so, naming it), resume, land on disk in the command line's layout, and repeat through the command line."""

import json
import time

import pytest

from jaxtune import Pair, RunConfig
from jaxtune.rundir import RunDirError
from jaxtune.runs import Registry

from test_cli import run as cli

QA = [Pair(f"Where is order {n}?", f"Order {n} is on its way.") for n in range(12)]
CFG = dict(model="tiny", validation_fraction=0.25, eval_every=2, save_every=4, samples=1,
           train=dict(epochs=3, batch_size=3, max_length=48, learning_rate=3e-3, seed=4))


def config(**train):
    return RunConfig.from_dict({**CFG, "train": {**CFG["train"], **train}})


def wait(runs, timeout=300, until=lambda r: r.status not in ("queued", "training")):
    deadline = time.time() + timeout
    while not all(until(r) for r in runs):
        assert time.time() < deadline, [(r.status, r.step) for r in runs]
        time.sleep(0.1)


def losses(path):
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()]


def test_runs_queue_in_order_land_on_disk_and_the_command_line_repeats_them(tmp_path):
    reg = Registry(tmp_path / "runs", concurrent=1)
    first, second = reg.start(config(), QA, name="first"), reg.start(config(seed=5), QA, name="second")
    wait([second], until=lambda r: reg.queue_text(r.id) and "ahead of yours (started" in reg.queue_text(r.id))
    assert reg.queue_text(second.id).startswith("1 run ahead of yours") and second.step == 0
    wait([first, second])
    assert first.status == second.status == "finished" and first.saved and second.saved
    assert first.id != second.id and len(first.id) >= 16  # unguessable
    for r in (first, second):
        files = {p.name for p in r.dir.iterdir()}
        assert {"config.yaml", "data.jsonl", "metrics.jsonl", "train.log", "run.json", "model.safetensors",
                "checkpoints"} <= files
        assert [h["step"] for h in r.history] == list(range(1, 10)) and r.val_loss is not None
    log = (first.dir / "train.log").read_text()
    assert "model: tiny" in log and "data: 9 pairs" in log and "steps in" in log  # the whole log, from the start
    # the command line, given the run's config.yaml, trains exactly the same losses
    p = cli("train", "--config", str(first.dir / "config.yaml"), "--output", str(tmp_path / "cli"))
    assert p.returncode == 0, p.stderr
    assert losses(tmp_path / "cli" / "metrics.jsonl") == losses(first.dir / "metrics.jsonl") == [h["loss"] for h in first.history]
    again = Registry(tmp_path / "runs")  # a restarted server lists both, as they ended
    assert [(r.name, r.status, r.step) for r in again.list()] == [("second", "finished", 9), ("first", "finished", 9)]
    assert [(r.pairs, r.held_out) for r in again.list()] == [(12, 3)] * 2  # the runs table: '9 + 3 held out'


def test_stop_while_queued_stop_while_training_then_resume(tmp_path):
    reg = Registry(tmp_path / "runs", concurrent=1)
    long = reg.start(config(epochs=400), QA, name="long")
    queued = reg.start(config(), QA, name="queued")
    wait([long], until=lambda r: r.step >= 3)
    assert reg.stop(queued.id)  # cancelled before it trained a step
    wait([queued])
    assert queued.status == "stopped" and "cancelled while it waited" in queued.message and queued.history == []
    assert reg.stop(long.id)
    wait([long])
    assert long.status == "stopped" and "stopped by request after step" in long.message and long.saved
    stopped_at = long.step
    log = [line.partition(" ")[2] for line in (long.dir / "train.log").read_text().splitlines()]  # after the time
    assert log[-2:] == [f"stopped by request after step {stopped_at}", "the model keeps what it learned and was saved"]
    assert long.resumable and (long.dir / "model.safetensors").exists()
    reg.resume(long.id)
    wait([long], until=lambda r: r.status == "training" and r.step > stopped_at + 2)
    reg.stop(long.id)
    wait([long])
    steps = [h["step"] for h in long.history]
    assert steps == list(range(1, long.step + 1))  # one history, continued from the checkpoint
    assert "resuming" in (long.dir / "train.log").read_text()
    done = reg.start(config(epochs=1), QA, name="done")
    wait([done])
    with pytest.raises(RunDirError, match="it finished"):
        reg.resume(done.id)


def test_limits_stop_runs_and_say_which(tmp_path):
    reg = Registry(tmp_path / "timed", max_seconds=1)
    timed = reg.start(config(epochs=400), QA)
    wait([timed])
    assert timed.status == "stopped" and "the time limit of 1 s (JAXTUNE_MAX_TRAIN_SECONDS) was reached" in timed.message
    assert f"after step {timed.step};" in timed.message and len(timed.history) == timed.step
    orphans = Registry(tmp_path / "orphans", orphan_seconds=3)
    kept, left = orphans.start(config(epochs=400), QA), orphans.start(config(epochs=400), QA)
    deadline = time.time() + 300
    while left.status != "stopped" and time.time() < deadline:  # a page keeps asking about `kept` only
        orphans.seen([kept.id])
        time.sleep(0.5)
    assert "no page had this run open for 3 s (JAXTUNE_ORPHAN_SECONDS); stopped after step" in left.message
    said = left.message.split("stopped after step ")[1]
    assert said == str(left.step) or said.startswith(f"{left.step};")  # the last step it ran (0: it was still queued)
    assert kept.status in ("queued", "training")
    orphans.stop(kept.id)
    wait([kept])


def test_delete_removes_only_what_jaxtune_wrote(tmp_path):
    reg = Registry(tmp_path / "runs")
    a, b = reg.start(config(epochs=1), QA), reg.start(config(epochs=1), QA)
    wait([a, b])
    (b.dir / "notes.txt").write_text("mine")
    reg.delete(a.id)
    reg.delete(b.id)
    assert not a.dir.exists() and sorted(p.name for p in b.dir.iterdir()) == ["notes.txt"]
    assert reg.list() == []  # both gone from the table


def test_the_runs_folder_and_its_cap_come_from_the_environment(tmp_path, monkeypatch):
    from jaxtune.runs import default_root

    monkeypatch.setenv("JAXTUNE_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("JAXTUNE_RUNS_MAX_MB", "64")
    assert default_root(public=True, app_dir=tmp_path) == (tmp_path, 64 * 2**20)
    assert default_root(public=False, app_dir=tmp_path) == (tmp_path, None)
    for bad in ("abc", "0", "-5", "1.5"):  # said in one line, not a traceback
        monkeypatch.setenv("JAXTUNE_RUNS_MAX_MB", bad)
        with pytest.raises(SystemExit, match=f"JAXTUNE_RUNS_MAX_MB='{bad}': expected a whole number of megabytes"):
            default_root(public=True, app_dir=tmp_path)


def test_the_closing_line_of_a_run_stopped_before_it_trained_says_so(tmp_path):
    """Ctrl-C before the first step read 'no step left to run (the checkpoint holds step 0, the last)'."""
    from jaxtune.runs import summarize
    from jaxtune.train import TrainResult

    stopped = TrainResult(steps=0, stopped="stopped by request after step 0", stop_requested=True, seconds=3.0)
    assert summarize(stopped, tmp_path).startswith("stopped before the first step in 3.0s")
    resumed = TrainResult(steps=10, first_step=11, stop_requested=True)  # a resume stopped before its first step
    assert summarize(resumed, tmp_path).startswith("stopped before step 11")
    done = TrainResult(steps=10, first_step=11)  # a resume of a run whose checkpoint holds its last step
    assert summarize(done, tmp_path).startswith("no step left to run (the checkpoint holds step 10, the last)")


def test_the_log_names_pairs_where_the_caller_had_them(tmp_path):
    """The app's runs said 'data.jsonl line 39: longer than 64 tokens', of a file the page never showed; the preview
    calls that pair 'row 39'."""
    reg = Registry(tmp_path / "runs")
    pairs = [Pair(p.instruction, p.response, f"row {n + 2}") for n, p in enumerate(QA)]
    pairs[4] = Pair("Where is order 4? " + "Please say. " * 20, "Order 4 is on its way.", "row 6")
    run = reg.start(config(epochs=1), pairs, name="rows")
    wait([run])
    log = (run.dir / "train.log").read_text()
    assert run.status == "finished" and "warning: row 6: nothing of the response fits" in log and "data.jsonl" not in log, \
        [x for x in log.splitlines() if "warning" in x or "data" in x]
