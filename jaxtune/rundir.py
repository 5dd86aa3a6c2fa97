"""Run directories: what jaxtune owns in them, what a resume may change, and checkpoint files that can be trusted.

A run directory (`--output`) records the entries jaxtune wrote in `.jaxtune-run.json`. Replacing or resuming a
run removes only those; a folder that holds anything else is never written into (the run can go into a new
subfolder instead). Each checkpoint step gets a list of its files with sizes and CRC-32s, written after orbax
committed it, so a truncated, partial or bit-flipped checkpoint is found before any of it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zlib
from pathlib import Path

MANIFEST = ".jaxtune-run.json"
CHECKSUMS = "jaxtune-files.json"  # inside each checkpoint step's folder
# What makes a folder a training run's, not only a model's: a save over them would lose the run (see `save`)
RUN_RECORDS = ("metrics.jsonl", "samples.jsonl", "config.yaml", "checkpoints")

# Options a resumed run must share with the stopped one: each changes the shapes, the data or its order, or what
# the saved state means. Anything else (epochs, max_steps, the rate's schedule, evaluation, saving) may change.
RESUME_FIXED = ("model", "split", "validation_data", "validation_fraction", "instruction_column", "response_column",
                "train.max_length", "train.batch_size", "train.grad_accum", "train.pack", "train.seed", "train.loss_on",
                "train.dtype", "train.fsdp", "train.buckets", "train.dropout", "train.lora_rank", "train.lora_alpha",
                "train.lora_targets", "train.lora_dropout", "train.quantize")
_ADDED_LATER = {"train.quantize": "none"}  # a run folder written before the option existed used its default


class RunDirError(ValueError):
    """A run directory that cannot be written or resumed as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- ownership
def owned(directory: Path) -> set[str]:
    """Top-level entries of `directory` that jaxtune wrote (empty when it holds no jaxtune run)."""
    try:
        names = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    # only plain entries of this folder: a crafted record must not reach outside it
    return {n for n in names if isinstance(n, str) and _plain(n)}


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def foreign(directory: Path) -> list[str]:
    """Entries of `directory` that jaxtune did not write, sorted (folders end with '/')."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    mine = owned(directory) | {MANIFEST}
    return sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir() if p.name not in mine)


def claim(directory: Path, names) -> None:
    """Record `names` as jaxtune's in `directory` (created if needed); the record is replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / MANIFEST, manifest_text(owned(directory) | set(names)))


def manifest_text(names) -> str:
    """The ownership record for these top-level entries."""
    return json.dumps({"jaxtune_run": 1, "files": sorted(set(names) - {MANIFEST})}, indent=1) + "\n"


def remove_owned(directory: Path) -> list[str]:
    """Delete what jaxtune wrote in `directory` (and nothing else); returns the names removed."""
    directory = Path(directory)
    removed = []
    for name in sorted(owned(directory)):
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    (directory / MANIFEST).unlink(missing_ok=True)
    return removed


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def has_checkpoint(run_dir) -> bool:
    """Whether a run folder holds a checkpoint to resume from (a step's folder under checkpoints/)."""
    folder = Path(run_dir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir())


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (links resolved): what replacing `folder` would delete."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def prepare_output(out: Path, *, overwrite: bool = False, resume: Path | None = None, subfolder: bool = False,
                   reads: dict[str, str | None] | None = None) -> Path:
    """The directory a run writes to, checked before anything is read or trained: new or empty; the run being
    resumed; or a jaxtune run replaced with `overwrite` (the run removes its files, and only those, once its data
    and model are loaded: a mistake found before then leaves it whole). A folder holding other files is refused,
    unless `subfolder` asks for a new `run-YYYYMMDD-HHMMSS` folder inside it. `reads` ({"--model": path, ...}): what
    the run reads, none of which `overwrite` may remove."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output {out} is a file; give a directory")
    above = next((p for p in out.parents if p.exists()), None)  # said now, not after the data and model are read
    if above is not None and not above.is_dir():
        raise RunDirError(f"--output {out}: {above} is a file, not a folder; give a directory path")
    if subfolder:
        stamp = time.strftime("run-%Y%m%d-%H%M%S")
        for n in range(1000):
            candidate = out / (stamp if n == 0 else f"{stamp}-{n}")
            if not candidate.exists():
                return candidate
    if not out.exists() or not any(out.iterdir()):
        return out
    others = foreign(out)
    if others:
        raise RunDirError(f"--output {out} holds files jaxtune did not write ({_listing(others)}); jaxtune never "
                          "writes into or deletes from such a folder. Choose a new or empty directory, or pass "
                          "--subfolder to put the run in a new folder inside it")
    if resume is not None and out.resolve() == Path(resume).resolve():
        return out
    if set(p.name for p in out.iterdir()) <= {MANIFEST, "metrics.jsonl"} and not _has_steps(out / "metrics.jsonl"):
        return out  # a run that failed before its first step (out of memory, say) left nothing to keep
    if overwrite:
        for flag, path in (reads or {}).items():
            if path and Path(path).expanduser().exists() and within(Path(path).expanduser(), out):
                raise RunDirError(f"{flag} {path} is inside --output {out}, which --overwrite replaces: the run would "
                                  f"delete what it reads, and name it afterwards. Copy it out of {out} first, or "
                                  "write the run to another directory")
    else:
        if (out / "checkpoints" / "config.yaml").exists() and has_checkpoint(out):
            raise RunDirError(f"--output {out} already holds a jaxtune run; continue it with --resume {out}, or pass "
                              "--overwrite to replace it")
        raise RunDirError(f"--output {out} already holds a jaxtune run, with no checkpoint to resume from (runs keep "
                          "them with --save-every, and on Ctrl-C); pass --overwrite to replace it, or choose another "
                          "directory")
    return out


def _has_steps(metrics: Path) -> bool:
    try:
        return bool(metrics.read_text(encoding="utf-8").strip())
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- resume
def data_fingerprint(pairs) -> str:
    """SHA-256 of the pairs' text, in order: the same data under another name or path has the same print."""
    h = hashlib.sha256()
    for p in pairs:
        for text in (p.instruction, p.response):
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def resume_conflicts(saved: dict, now: dict) -> list[str]:
    """`option: saved -> now` for every fixed option (RESUME_FIXED) that differs between two run configs."""
    a, b = {**_ADDED_LATER, **_flat(saved)}, {**_ADDED_LATER, **_flat(now)}
    for flat in (a, b):  # validation data is compared by content once read (its path may be written another way)
        flat["validation_data"] = bool(flat.get("validation_data"))
    return [_change(k, a.get(k), b.get(k)) for k in RESUME_FIXED if a.get(k) != b.get(k)]


def resume_changes(saved: dict, now: dict) -> list[str]:
    """`option: saved -> now` for the options a resume may change (the rate, its schedule, the run's length,
    regularisation; merge; when validation loss is measured) that it does change."""
    a, b = _flat(saved), _flat(now)
    keys = [k for k in b if (k.startswith("train.") or k in ("merge", "eval_every", "early_stopping")) and k not in RESUME_FIXED
            and k in a and a[k] != b[k]]
    return [_change(k, a[k], b[k]) for k in keys]


def _change(key: str, old, new) -> str:
    """`max_steps: none -> 3`, as an option is named and set: unset is 'none', not Python's None."""
    def shown(v):
        return "none" if v is None else repr(v)
    return f"{key.removeprefix('train.')}: {shown(old)} -> {shown(new)}"


# ---------------------------------------------------------------------------------------------- checkpoint files
def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_checksums(step_dir: Path) -> None:
    """Record every file under a committed checkpoint step (relative path, size, CRC-32)."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc(p)]
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
    _write_atomic(step_dir / CHECKSUMS, json.dumps({"files": files}) + "\n")


def verify_checksums(step_dir: Path) -> str | None:
    """None when every recorded file is there, whole and unchanged; otherwise what is wrong, in words."""
    step_dir = Path(step_dir)
    try:
        files = json.loads((step_dir / CHECKSUMS).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "it has no file list (it was being written when the run stopped)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its file list {CHECKSUMS} is damaged"
    for name, (size, crc) in files.items():
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"its file list names {name!r}, outside the checkpoint"
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes, {size:,} were written"
        if _crc(path) != crc:
            return f"{name} has changed since it was written (checksum mismatch)"
    return None


def readable_by_all(path) -> None:
    """The file's mode as an ordinary new file's (0644 under the usual umask): safetensors writes weights 0600, and a
    temporary file is 0600, so another user or a web server could not read what a run wrote."""
    try:
        umask = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = 0o022
    os.chmod(path, 0o666 & ~umask)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
