"""Experiment tracking through the real command line: TensorBoard event files, trackio's local store and W&B's
offline run are read back and hold what metrics.jsonl holds; a missing package is a clear install hint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cli import PAIRS, ROOT, run, write_jsonl


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B .wandb file (a LevelDB-style log after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, records, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def test_metrics_reach_tensorboard_trackio_and_wandb(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    env = {"TRACKIO_DIR": str(tmp_path / "trackio"), "WANDB_MODE": "offline"}
    os.environ.update(env)
    try:
        p = run("train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "2",
                "--batch-size", "4", "--max-length", "48", "--validation-fraction", "0.25", "--eval-every", "2",
                "--report-to", "tensorboard", "trackio", "wandb")
    finally:
        for k in env:
            os.environ.pop(k)
    assert p.returncode == 0, p.stderr
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    val = {m["step"]: m["val_loss"] for m in metrics if m["val_loss"] is not None}
    assert len(losses) == 6 and len(val) == 3

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tb = events.Scalars("train/loss")
    assert [e.step for e in tb] == list(range(1, 7))
    np.testing.assert_allclose([e.value for e in tb], losses, rtol=1e-6)
    assert {e.step: e.value for e in events.Scalars("eval/loss")} == pytest.approx(val, rel=1e-6)
    assert "config" in events.Tags()["tensors"]  # the run's configuration, as text

    read = subprocess.run([sys.executable, "-c", (
        "import json; from trackio.sqlite_storage import SQLiteStorage as S;"
        "print(json.dumps(S.get_logs(project='jaxtune', run='run')))")],
        capture_output=True, text=True, env=dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio")), timeout=120)
    assert read.returncode == 0, read.stderr
    logs = json.loads(read.stdout.strip().splitlines()[-1])
    assert [r["step"] for r in logs] == list(range(1, 7))
    np.testing.assert_allclose([r["train/loss"] for r in logs], losses, rtol=1e-6)

    (offline,) = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(offline)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    np.testing.assert_allclose([h["train/loss"] for h in history if "train/loss" in h], losses, rtol=1e-6)
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for item in r.run.config.update}
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}  # W&B wraps values
    assert config["train"]["max_length"] == 48 and config["report_to"] == ["tensorboard", "trackio", "wandb"]
    assert {"tensorboard", "wandb"} <= set(json.loads((tmp_path / "run" / ".jaxtune-run.json").read_text())["files"])


def test_a_missing_tracker_package_is_an_install_hint(tmp_path):
    from jaxtune.tracking import TrackingError, check_reporters

    with pytest.raises(TrackingError, match="'none' with 'tensorboard': 'none' reports nowhere; give it alone"):
        check_reporters(["none", "tensorboard"])
    assert check_reporters(["none"]) == [] and check_reporters(["tensorboard", "tensorboard"]) == ["tensorboard"]
    data = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    code = ("import sys; sys.modules['wandb'] = None; from jaxtune.cli import main; "
            f"sys.exit(main(['train', '--model', 'tiny', '--data', {str(data)!r}, '--output', {str(tmp_path / 'o')!r}, "
            "'--report-to', 'wandb']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    assert p.returncode == 2 and "--report-to wandb needs the wandb package" in p.stderr and "pip install wandb" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    p = subprocess.run([sys.executable, "-m", "jaxtune", "train", "--model", "tiny", "--data", str(data), "--output",
                        str(tmp_path / "w"), "--report-to", "wandb"], capture_output=True, text=True, timeout=300,
                       env=dict(env, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", NETRC=str(tmp_path / "no-netrc"),
                                HOME=str(tmp_path)))  # installed, and no key: said before anything loads
    assert p.returncode == 2 and "--report-to wandb: no W&B API key on this machine" in p.stderr, p.stderr[-2000:]
    assert "WANDB_MODE=offline" in p.stderr and "Traceback" not in p.stderr and not (tmp_path / "w").exists()
