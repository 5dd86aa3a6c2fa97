"""Experiment tracking: what metrics.jsonl holds, and the run's configuration, sent to TensorBoard, trackio or
Weights & Biases as the steps finish (`--report-to`, several allowed). Each is an optional dependency: a missing
package is a clear error with the pip command, raised before training starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPORTERS = ("none", "tensorboard", "trackio", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
# StepMetrics fields that are numbers worth plotting, by the name they are logged under
_SCALARS = {"loss": "train/loss", "val_loss": "eval/loss", "val_perplexity": "eval/perplexity",
            "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
            "tokens_per_sec": "train/tokens_per_sec", "epoch": "train/epoch"}


class TrackingError(ValueError):
    """A reporter that cannot be used (unknown name, package not installed)."""


def check_reporters(names) -> list[str]:
    """The reporters asked for, checked: known names, their packages importable; 'none' alone means none."""
    names = [n.strip() for n in ([names] if isinstance(names, str) else list(names or [])) if n and n.strip()]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise TrackingError(f"report_to: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(REPORTERS)}")
    if "none" in names and len(set(names)) > 1:
        raise TrackingError(f"report_to: 'none' with {', '.join(repr(n) for n in names if n != 'none')}: 'none' "
                            "reports nowhere; give it alone, or leave it out")
    names = [n for n in dict.fromkeys(names) if n != "none"]
    import importlib

    for name in names:
        try:
            importlib.import_module(_PACKAGES[name])
        except ImportError:
            raise TrackingError(f"--report-to {name} needs the {_PACKAGES[name]} package, which is not installed: "
                                f"pip install {_PACKAGES[name]}  (or leave --report-to out)") from None
    if "wandb" in names and not _wandb_can_log():
        raise TrackingError("--report-to wandb: no W&B API key on this machine. Run `wandb login` (or set "
                            "WANDB_API_KEY), or set WANDB_MODE=offline to keep the run's W&B logs in the run folder")
    return names


def _wandb_can_log() -> bool:
    """W&B has what a run needs to start: an offline or disabled mode, an API key in the environment, or a login
    (wandb login writes the key to ~/.netrc for its host)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled", "dryrun") or \
            os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def scalars(step: dict) -> dict[str, float]:
    """A metrics.jsonl record as the scalars a tracker plots."""
    return {tag: float(step[key]) for key, tag in _SCALARS.items() if step.get(key) is not None}


class Tracker:
    """Sends every finished step to each reporter; `close()` flushes them. Reporters write under `run_dir`
    (TensorBoard event files in run_dir/tensorboard, W&B's files in run_dir/wandb), trackio in its own store."""

    def __init__(self, names, *, run_dir: Path, name: str, config: dict, project: str = "jaxtune"):
        self.names = check_reporters(names)
        self.run_dir, self._closers, self._loggers = Path(run_dir), [], []
        for reporter in self.names:
            try:
                getattr(self, f"_start_{reporter}")(name=name, config=config, project=project)
            except Exception as e:  # noqa: BLE001 - each tracker's own errors: said in one line, with what to do
                self.close()
                raise TrackingError(f"--report-to {reporter} could not start: {str(e).splitlines()[0][:300]} (fix "
                                    f"that, or leave {reporter} out of --report-to)") from None

    def _start_tensorboard(self, *, name, config, project):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        writer = EventFileWriter(str(self.run_dir / "tensorboard"))
        text = "```\n" + json.dumps(config, indent=2) + "\n```"
        from tensorboard.plugins.text.summary_v2 import text_pb

        writer.add_event(Event(step=0, summary=text_pb("config", text)))

        def log(step, values):
            writer.add_event(Event(step=step, summary=Summary(value=[Summary.Value(tag=k, simple_value=v)
                                                                     for k, v in values.items()])))

        self._loggers.append(log)
        self._closers.append(writer.close)

    def _start_trackio(self, *, name, config, project):
        import trackio

        run = trackio.init(project=project, name=name, config=config)

        self._loggers.append(lambda step, values: run.log(values, step=step))
        self._closers.append(run.finish)

    def _start_wandb(self, *, name, config, project):
        import wandb

        (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, name=name, config=config, dir=str(self.run_dir), reinit="create_new",
                         settings=wandb.Settings(console="off"))  # the terminal stays jaxtune's
        self._loggers.append(lambda step, values: run.log(values, step=step))
        self._closers.append(run.finish)

    def log(self, step: dict) -> None:
        values = scalars(step)
        for log in self._loggers:
            log(int(step["step"]), values)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers, self._loggers = [], []
