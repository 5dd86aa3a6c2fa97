"""jaxtune's Gradio app: paste or upload instruction/response pairs, train GPT-2 in JAX, try it, export it.

    python app.py        # http://127.0.0.1:7860 ; on a Hugging Face Space it runs as it is

Only the front end lives here. Runs belong to the server, not to a page: Start hands the run to a
`jaxtune.runs.Registry` (the same `execute` as `python -m jaxtune train`), which trains it in its own worker and
writes its folder (config.yaml, metrics.jsonl, train.log, checkpoints, the Hugging Face model). The browser keeps
its run ids (`gr.BrowserState`) and a 1 s `gr.Timer` redraws the chosen run, so a reload or a closed tab loses
nothing. A desktop lists every run in the folder; a public Space only the browser's own.

Anyone can call a Space's API with gradio_client, bypassing the widgets, so every value is checked here, on the
server, against `BOUNDS` and the limits below before anything is loaded or allocated. With `SPACE_ID` set (a
Hugging Face Space) or `JAXTUNE_PUBLIC=1` the app is public: the model field takes hub ids and the embedded
presets only, never a path on the server, and uploads are limited in size and rows.
"""

from __future__ import annotations

import os

# transformers prints "PyTorch was not found..." when it is imported without torch (as on a Space): the app only
# uses its tokenizers, so its warnings are left out of the server's output.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from jaxtune.launch import restart_with_huge_pages  # noqa: E402  (the standard library only)

restart_with_huge_pages()  # `python app.py` starts once more with huge pages for XLA's buffers, before any import

import atexit  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
import weakref  # noqa: E402
import zipfile  # noqa: E402
from collections import OrderedDict  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import jax  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from flax import nnx  # noqa: E402

import jaxtune  # noqa: E402
import jaxtune.evaluate  # noqa: E402
from jaxtune.card import hub_id, own_base, portable_config_text, push, push_error  # noqa: E402
from jaxtune.sharding import enable_compilation_cache  # noqa: E402
from jaxtune.checkpoint import (EMBEDDED, ModelLoadError, hub_reachable, hub_snapshot, load_directory,  # noqa: E402
                                offline_tokenizer, to_host)
from jaxtune.config import LOSS_MODES, PRESETS, GPT2Config, RunConfig, TrainConfig  # noqa: E402
from jaxtune.data import (REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES, DataError,  # noqa: E402
                          inspect_rows, invalid_character, read_pairs, record_to_pair)
from jaxtune.lora import is_adapter_dir, load_adapter, merge, merged_beside  # noqa: E402
from jaxtune.model import abstract, num_params  # noqa: E402
from jaxtune.rundir import RunDirError  # noqa: E402
from jaxtune.runs import ACTIVE, Registry, default_root, held_out, plural, split_validation  # noqa: E402
from jaxtune.train import offloads_by_default  # noqa: E402

log = logging.getLogger("jaxtune.app")

EXAMPLE_DATA = Path(__file__).parent / "examples" / "customer_service.jsonl"
HELD_OUT_DATA = Path(__file__).parent / "examples" / "customer_service_val.jsonl"  # other wording, never trained on
MODEL_CHOICES = ["auto", EMBEDDED, "gpt2", "distilgpt2", "gpt2-medium"]
PRECISIONS = ("float32", "bfloat16")
# Training methods: (TrainConfig.lora_rank is the rank or 0, TrainConfig.quantize). QLoRA holds the frozen base in
# 4-bit NF4 and trains LoRA adapters on it, as the QLoRA paper does.
METHODS = {"Full fine-tuning": (False, "none"), "LoRA": (True, "none"), "QLoRA": (True, "nf4")}
LORA_RANK = 16  # the default rank (alpha defaults to 2 x rank in the library)
EARLY_STOPPING = 3  # Keep the best: evaluations without a lower validation loss before a run stops (of about 10)
HEADERS = ["Instruction", "Response"]
UPLOAD_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TOKENIZER = offline_tokenizer()  # GPT-2's vocabulary, for previews before any model is loaded


# ---------------------------------------------------------------------------------------------- limits
def _env_number(name: str, default, lo, hi, kind=int):
    """A limit from the environment; a value that is not a number in [lo, hi] stops the app with a clear message."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not lo <= value <= hi:
        raise SystemExit(f"{name}={raw!r}: expected {'a whole number' if kind is int else 'a number'} from {lo} to {hi}")
    return value


def _machine_memory() -> int:
    """Bytes a run can use: the accelerator's own memory, or the host's RAM (or the container's limit, if lower)."""
    try:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit)
    except Exception:  # noqa: BLE001 - CPUs report no memory stats
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(cgroup).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


PUBLIC = bool(os.environ.get("SPACE_ID")) or os.environ.get("JAXTUNE_PUBLIC", "").strip().lower() in ("1", "true", "yes")
BACKEND = jax.default_backend()
CONCURRENT_RUNS = _env_number("JAXTUNE_CONCURRENT_RUNS", 1, 1, 64)  # training runs at once; others queue
# Runs one browser may have queued or training at once, and runs the whole queue holds (0: no limit). A public
# server's queue is shared by strangers: without them one visitor could queue hours of runs ahead of everyone.
RUNS_PER_BROWSER = _env_number("JAXTUNE_RUNS_PER_BROWSER", 2 if PUBLIC else 0, 0, 10**6)
MAX_QUEUED = _env_number("JAXTUNE_MAX_QUEUED", 8 if PUBLIC else 0, 0, 10**6)
# The whole run, from the request to the last step (loading, tokenizing and compiling included), is stopped after this.
MAX_TRAIN_SECONDS = _env_number("JAXTUNE_MAX_TRAIN_SECONDS", 3600, 1, 7 * 86400)
# Generous ceilings on what one run can do per second on this backend. The tiny model on 2 CPU cores does about 3-30
# steps/s and 20-200 examples/s; 124M-parameter GPT-2 far fewer. A run planned beyond what the time limit allows at
# these rates cannot finish anyway, and is refused before anything is allocated for it.
STEPS_PER_SECOND = 50 if BACKEND == "cpu" else 500
EXAMPLES_PER_SECOND = 2_000 if BACKEND == "cpu" else 20_000
MAX_STEPS = _env_number("JAXTUNE_MAX_STEPS", MAX_TRAIN_SECONDS * STEPS_PER_SECOND, 1, 10**9)
MAX_EXAMPLES_SEEN = _env_number("JAXTUNE_MAX_EXAMPLES_SEEN", MAX_TRAIN_SECONDS * EXAMPLES_PER_SECOND, 1, 10**10)
# Memory for one run: 80% of the machine's (JAXTUNE_MEMORY_GB overrides), shared by the concurrent runs.
MEMORY_BYTES = int(_env_number("JAXTUNE_MEMORY_GB", _machine_memory() / 2**30, 0.1, 1e6, float) * 2**30)
RUN_MEMORY = int(0.8 * MEMORY_BYTES / CONCURRENT_RUNS)
BYTES_PER_PARAMETER = 24  # the shared base, the trained copy, its float32 master, gradients, AdamW's two moments
# LoRA and QLoRA: the shared base and the run's frozen float32 copy (QLoRA quantizes that copy once it is made); the
# adapters, their gradients and AdamW's moments are counted apart (16 bytes each).
LORA_BYTES_PER_PARAMETER = 8
MAX_PARAMETERS = RUN_MEMORY // BYTES_PER_PARAMETER  # 16 GB (a cpu-basic Space): 572M, gpt2-medium but not gpt2-large
MAX_LORA_PARAMETERS = RUN_MEMORY // LORA_BYTES_PER_PARAMETER  # 16 GB: 1.7B, gpt2-xl (1.56B) with small batches
# Data: rows in one session's data, upload size (0: no limit), rows of the table sent to the browser.
MAX_ROWS = _env_number("JAXTUNE_MAX_ROWS", 20_000 if PUBLIC else 1_000_000, 1, 10**8)
MAX_UPLOAD_MB = _env_number("JAXTUNE_MAX_UPLOAD_MB", 20.0 if PUBLIC else 0.0, 0.0, 1e6, float)
MAX_UPLOAD_BYTES = int(MAX_UPLOAD_MB * 2**20) or None
MAX_TEXT_CHARS = MAX_UPLOAD_BYTES or 2**30  # characters in all of a table's cells: no more than an upload may hold
TABLE_ROWS = _env_number("JAXTUNE_TABLE_ROWS", 200, 1, 100_000)
CONFIRM_SECONDS = 10  # a second press within this confirms what the first one asked (Delete, Load example data)
MAX_INSTRUCTION_CHARS = 8_000  # more than GPT-2's 1024-token context holds; longer prompts are refused
# Evaluate: held-out pairs answered per request (the first ones beyond are left out, saying so), new tokens per
# answer, and finished runs compared at once beside the base. A public server answers fewer, shorter.
MAX_EVAL_PAIRS = _env_number("JAXTUNE_EVAL_MAX_PAIRS", 100 if PUBLIC else 10_000, 1, 10**7)
MAX_EVAL_NEW_TOKENS = _env_number("JAXTUNE_EVAL_MAX_NEW_TOKENS", 64 if PUBLIC else 256, 8, 256)
MAX_EVAL_RUNS = 4
# Answers in batches of 16, not the library's 64, so progress moves every 16 answers: on 2 CPU cores the untrained
# tiny model answered the 58 bundled pairs in 4.49 s so, against 4.31 s in one batch (compiled, 64 new tokens).
EVAL_BATCH_SIZE = 16
# One evaluation answers at a time (they would share the same cores); up to EVAL_WAITING more wait in the app's own
# order, each page saying how many are ahead of it. Gradio's queue holds any beyond, as it holds other events.
EVAL_WAITING = 4
_EVAL_TURNS: list = []  # tickets of the evaluations that answer or wait, in order; the first one answers
_EVAL_TURN = threading.Condition()
# Gradio's cache (uploads, exported zips): every 30 minutes, files older than an hour are deleted; all at shutdown.
DELETE_CACHE = (1800, 3600)


@dataclass(frozen=True)
class Bound:
    label: str
    lo: float
    hi: float
    integer: bool
    advice: str
    lo_open: bool = False  # lo itself is not allowed (a learning rate must be > 0)
    step: int = 1  # integers must be multiples of this
    why: str = ""


_STEPS_WHY = ("JAXTUNE_MAX_STEPS" if os.environ.get("JAXTUNE_MAX_STEPS", "").strip() else
              f"the time limit of {MAX_TRAIN_SECONDS:,} s at up to {STEPS_PER_SECOND} steps/s")
LIBRARY_MAX_EPOCHS = 100_000  # jaxtune's TrainConfig refuses more

# Every number the server accepts, and why. The widgets show the same ranges; the server checks them again, since an
# API call carries whatever it likes (None, text, NaN, 10**9). Training runs are further bounded as a whole: epochs x
# steps per epoch <= MAX_STEPS, epochs x pairs <= MAX_EXAMPLES_SEEN, and the model, batch and length must fit
# RUN_MEMORY by `run_bytes`.
BOUNDS = {
    # a pass over the data is at least one step
    "epochs": Bound("Epochs", 1, min(MAX_STEPS, LIBRARY_MAX_EPOCHS), True, "Lower the epochs.",
                    why=_STEPS_WHY if MAX_STEPS < LIBRARY_MAX_EPOCHS else "jaxtune's limit"),
    # rows a step; memory decides the rest (batch x max length, see run_bytes)
    "batch_size": Bound("Batch size", 1, 256, True, "Lower the batch size."),
    # GPT-2's context; capped again at the chosen model's n_positions
    "max_length": Bound("Max length", 8, 1024, True, "Pick a max length within GPT-2's context."),
    # warmup longer than the run is cut to the run by the schedule; more than MAX_STEPS is never meaningful
    "warmup_steps": Bound("Warmup steps", 0, MAX_STEPS, True, "Lower the warmup steps.", why=_STEPS_WHY),
    # AdamW on GPT-2: 1e-5..1e-2 in practice; at 1 each update is as large as the weights (the tiny model's loss
    # jumps from 11 to 24 and 199 in its first steps); no recipe goes beyond
    "learning_rate": Bound("Learning rate", 0, 1.0, False, "Try 5e-5 for a pretrained model, 5e-3 for tiny.",
                           lo_open=True),
    # numpy's and JAX's seeds: 32 bits
    "seed": Bound("Seed", 0, 2**32 - 1, True, "Pick another seed."),
    "validation_fraction": Bound("Validation fraction", 0, 0.5, False, "Hold out at most half of the pairs."),
    "temperature": Bound("Temperature", 0, 1.5, False, "Use 0 for greedy answers."),
    "top_p": Bound("Top-p", 0.05, 1.0, False, "Use 1 to sample from the whole distribution."),
    # each size compiles its own generation program, so sizes come in steps of 8
    "max_new_tokens": Bound("Max new tokens", 8, 256, True, "Use the slider's values.", step=8),
    "preview_row": Bound("Preview row", 1, MAX_ROWS, True, "Pick a row of the table."),
    # Evaluate's answers: the same programs as Try's (multiples of 8), fewer on a public server
    "eval_max_new_tokens": Bound("Max new tokens", 8, MAX_EVAL_NEW_TOKENS // 8 * 8, True,
                                 "Lower the max new tokens.", step=8,
                                 why="JAXTUNE_EVAL_MAX_NEW_TOKENS" if os.environ.get("JAXTUNE_EVAL_MAX_NEW_TOKENS", "")
                                 .strip() else "this server's limit" if PUBLIC else ""),
    # at rank 256 an adapter of GPT-2's 768 x 2304 c_attn has 44% of the projection's parameters: no longer "low"
    "lora_rank": Bound("LoRA rank", 1, 256, True, "Pick a rank from 1 to 256 (8 to 64 is usual)."),
}


def run_bytes(config: GPT2Config, batch_size: int, max_length: int, lora_rank: int = 0, keep_best: bool = False) -> int:
    """A training run's memory by this app's estimate: BYTES_PER_PARAMETER for each parameter (LoRA and QLoRA:
    LORA_BYTES_PER_PARAMETER, and 16 for each adapter parameter on the default targets), and activations of 68 x width + 10 x heads
    x length bytes per token and layer (Korthikanti et al.'s count, in float32) plus 12 x vocab per token for the
    logits, times 1.5: that matches XLA's plan for gpt2-xl on CPU (27 GiB a 1024-token row). Keep the best holds a
    float32 copy of the trained parameters (the lowest validation loss's) in host memory: 4 bytes each more."""
    per_token = (config.n_layer * (68 * config.n_embd + 10 * config.n_head * max_length) + 12 * config.vocab_size) * 1.5
    if lora_rank:  # adapters on c_attn (width + 3 x width), attn.c_proj (2 x width), mlp.c_proj (4 x width + width)
        trained = config.n_layer * lora_rank * 11 * config.n_embd
        weights = LORA_BYTES_PER_PARAMETER * _parameters(config) + 16 * trained
    else:
        trained = _parameters(config)
        weights = BYTES_PER_PARAMETER * trained
    return int(weights + 4 * trained * keep_best + batch_size * max_length * per_token)


@functools.lru_cache(maxsize=64)
def _parameters(config: GPT2Config) -> int:
    return num_params(abstract(config))  # shapes only: nothing is allocated


# ---------------------------------------------------------------------------------------------- checks
def _fmt(x) -> str:
    return f"{x:,}" if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1000 else f"{x:g}"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value):
    """`value` as the int or float BOUNDS[name] allows, or a gr.Error that says what, the range and what to do."""
    b = BOUNDS[name]
    kind = (f"a multiple of {b.step}" if b.step > 1 else "a whole number") if b.integer else "a number"
    allowed = f"greater than {_fmt(b.lo)} and at most {_fmt(b.hi)}" if b.lo_open else f"from {_fmt(b.lo)} to {_fmt(b.hi)}"
    why = f" ({b.why})" if b.why else ""

    def refuse(got, advice=b.advice):
        raise gr.Error(f"{b.label} must be {kind} {allowed}{why}; got {got}. {advice}", title=f"{b.label}")

    if value is None or (isinstance(value, str) and not value.strip()):
        refuse("nothing (the field is empty)", "Enter a value.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        refuse(f"the {'text' if isinstance(value, str) else type(value).__name__} {_shown(value)}", "Enter a number.")
    if isinstance(value, float) and not math.isfinite(value):
        refuse(str(value), "Enter a finite number.")
    if b.integer and isinstance(value, float):
        if not value.is_integer():
            refuse(_shown(value), f"Enter {kind}.")
        value = int(value)
    got = _fmt(value) if abs(value) < 10**15 else _shown(value)
    if value > b.hi:
        refuse(got)
    if value < b.lo or (b.lo_open and value <= b.lo):  # the advice is for values above the range ("Lower the ...")
        refuse(got, b.advice if not b.advice.startswith("Lower") else
               f"Enter {'a value above' if b.lo_open else 'at least'} {_fmt(b.lo)}.")
    if b.integer and value % b.step:
        refuse(got, f"Enter {kind}.")
    return value if b.integer else float(value)


def _choice(label: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise gr.Error(f"{label} must be one of {', '.join(choices)}; got {_shown(value)}.", title=label)
    return value


def _flag(label: str, value) -> bool:
    if not isinstance(value, bool):
        raise gr.Error(f"{label} must be true or false; got {_shown(value)}.", title=label)
    return value


def _text(label: str, value, max_chars: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise gr.Error(f"{label} must be text; got {_shown(value)}.", title=label)
    if len(value) > max_chars:
        raise gr.Error(f"{label} is {len(value):,} characters; at most {max_chars:,} are allowed. Shorten it.",
                       title=label)
    bad = invalid_character(value)
    if bad is not None:
        raise gr.Error(f"{label} holds a character that is not valid text at position {bad + 1} (an unpaired "
                       "surrogate, U+D800-U+DFFF); fix or remove it.", title=label)
    return value


# A Hugging Face repository id: one name or owner/name, each of letters, digits and single . - _ between them.
HUB_ID = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9]|[._-](?=[A-Za-z0-9])){0,95}/)?"
                    r"[A-Za-z0-9](?:[A-Za-z0-9]|[._-](?=[A-Za-z0-9])){0,95}")
PUBLIC_MODEL_RULE = (f"On this server a model is a Hugging Face hub id (such as gpt2, distilgpt2 or owner/name), "
                     f"{EMBEDDED} (the embedded offline model) or auto. Pick one from the list or type a hub id.")


def _model_name(value) -> str:
    """The model to load. Public: a hub id or a preset, never a path; one message for every refused value, so
    that nothing is said about the server's files."""
    name = value.strip() if isinstance(value, str) else value
    if name is None or name == "":
        return "auto"
    if name in ("auto", EMBEDDED):
        return name
    if PUBLIC:
        if not isinstance(name, str) or not HUB_ID.fullmatch(name):
            raise gr.Error(PUBLIC_MODEL_RULE, title="Model")
        return name
    if not isinstance(name, str) or len(name) > 4096 or "\x00" in name:
        raise gr.Error("The model must be a hub id (such as gpt2), a local model directory, tiny or auto.",
                       title="Model")
    return name


# ---------------------------------------------------------------------------------------------- errors
class _Blocks(gr.Blocks):
    """gr.Blocks that refuses a request Gradio cannot even hand to the event's function (too few values, a value a
    component cannot take: an API client's mistake) with one line in the log and a message to the client, where
    Gradio prints a traceback that echoes the whole request (2 MB of log for one 2 MB request)."""

    async def preprocess_data(self, block_fn, *args, **kwargs):
        try:
            return await super().preprocess_data(block_fn, *args, **kwargs)
        except gr.Error as e:
            e.print_exception = False
            log.info("%s refused: %s", block_fn.api_name or block_fn.name, str(e).splitlines()[0][:300] if str(e) else "")
            raise
        except Exception as e:  # noqa: BLE001 - whatever a component's preprocessing raises for a malformed value
            name = block_fn.api_name or block_fn.name
            log.info("%s refused before it ran: %s", name, (str(e).splitlines() or [type(e).__name__])[0][:200])
            inputs = args[0] if args and isinstance(args[0], list) else None
            given = (f"it takes {plural(len(block_fn.inputs), 'value')} and the request gave {len(inputs)}"
                     if inputs is not None and len(inputs) != len(block_fn.inputs) else
                     "a value is not of the kind its input takes (a table as headers and data rows, numbers as numbers)")
            raise gr.Error(f"This request does not fit /{name}: {given}. The page's 'Use via API' link lists what each "
                           "endpoint takes.", title="Bad request", print_exception=False) from None


def _guarded(fn):
    """gr.Error goes to the user as it is, and to the log as one line (Gradio would print its traceback: 40 lines for
    a mistyped value); anything else is logged here with its traceback and a reference, and the user gets a message
    without the exception's text (which could name the server's files)."""
    def refused(e: gr.Error) -> gr.Error:
        e.print_exception = False
        log.info("%s refused: %s", fn.__name__, str(getattr(e, "message", e)).splitlines()[0][:300])
        return e

    def unexpected(e):
        ref = uuid.uuid4().hex[:8]
        log.error("%s failed (reference %s)", fn.__name__, ref, exc_info=e)
        return gr.Error(f"Something went wrong on the server (reference {ref}). Try again; if it happens again, "
                        f"report the reference.", title="Server error", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error as e:
                raise refused(e)
            except Exception as e:  # noqa: BLE001
                raise unexpected(e) from None
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            raise refused(e)
        except Exception as e:  # noqa: BLE001
            raise unexpected(e) from None
    return function




# ---------------------------------------------------------------------------------------------- runs
# Runs live in a folder on the server (JAXTUNE_RUNS_DIR; runs/ beside the app on a desktop; on a Space /data when
# persistent storage is mounted, else a capped temporary folder). On a Space a run no page has polled for
# JAXTUNE_ORPHAN_SECONDS is checkpointed and stopped; a desktop run goes on with no page open.
RUNS_DIR, RUNS_SIZE_CAP = default_root(public=PUBLIC, app_dir=Path(__file__).parent)
ORPHAN_SECONDS = _env_number("JAXTUNE_ORPHAN_SECONDS", 600, 1, 7 * 86400) if PUBLIC else None
POLL_SECONDS = 1.0
TUNED_CACHE = 3  # trained models kept loaded for Try


@dataclass(frozen=True)
class Defaults:
    epochs: int
    batch_size: int
    learning_rate: float
    max_length: int
    warmup_steps: int
    why: str


# The embedded model starts from random weights: it needs many steps at a high rate to learn anything (these are
# configs/cpu-quick.yaml's, a few minutes on two CPU cores for the example data). Pretrained weights need only a
# few passes at a low rate, or they forget what they knew.
TINY_DEFAULTS = Defaults(20, 8, 5e-3, 96, 20, f"**{EMBEDDED}** starts from random weights, so it gets many steps at a "
                         "high learning rate (configs/cpu-quick.yaml: 20 epochs, 5e-3; a few minutes on 2 CPU cores "
                         "for the example data).")
PRETRAINED_DEFAULTS = Defaults(3, 8, 5e-5, 128, 10, "**{name}** is pretrained, so it gets fine-tuning settings: 3 "
                               "epochs at 5e-5, enough to learn the format without forgetting what it knew.")
DEFAULT_FIELDS = ("epochs", "batch_size", "learning_rate", "max_length", "warmup_steps")


@functools.lru_cache(maxsize=1)
def _auto_model() -> str:
    """What auto will load: gpt2 when it is cached or the hub can be reached, else the embedded model."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache("gpt2", "model.safetensors"), str):
            return "gpt2"
    except Exception:  # noqa: BLE001 - no cache
        pass
    return "gpt2" if hub_reachable(timeout=1.0) else EMBEDDED


def model_defaults(name) -> Defaults:
    resolved = _auto_model() if name in (None, "", "auto") else str(name)
    if resolved == EMBEDDED:
        why = TINY_DEFAULTS.why if name == EMBEDDED else (
            f"auto means {EMBEDDED} here (gpt2 is neither cached nor reachable). {TINY_DEFAULTS.why}")
        return Defaults(**{**TINY_DEFAULTS.__dict__, "why": why})
    label = resolved if name == resolved else f"auto ({resolved})"
    if hub_id(resolved) is None and not (Path(resolved).expanduser() / "config.json").is_file():
        return Defaults(**{**PRETRAINED_DEFAULTS.__dict__, "why": (
            f"**{resolved}** is neither a model folder here (a Hugging Face folder with config.json) nor a hub id "
            f"(gpt2, owner/name): check the name. The fields hold fine-tuning settings meanwhile.")})
    if resolved not in PRESETS and not (Path(resolved).expanduser() / "config.json").is_file() and not _cached(resolved):
        return Defaults(**{**PRETRAINED_DEFAULTS.__dict__, "why": (  # nothing on this machine says what it is yet
            f"**{resolved}** is not on this machine: a run downloads it from the hub, if the hub has it. The fields "
            "hold fine-tuning settings, as for a pretrained GPT-2: 3 epochs at 5e-5.")})
    return Defaults(**{**PRETRAINED_DEFAULTS.__dict__, "why": PRETRAINED_DEFAULTS.why.format(name=label)})


def _cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the hub model, as `load` would find it there (the disk only)."""
    try:
        hub_snapshot(repo_id, local_only=True)
        return True
    except Exception:  # noqa: BLE001 - not cached, or a name the hub library cannot take
        return False


def _model_cache_key(name: str, seed: int):
    """The embedded model's random weights depend on the seed (so does auto's fallback); hub models do not."""
    return (name, seed) if name in ("auto", EMBEDDED) else (name, 0)


_BASES: OrderedDict = OrderedDict()
_BASES_LOCK = threading.Lock()
_TUNED: OrderedDict = OrderedDict()  # (run id, model file mtime) -> (model, tokenizer)
_TUNED_LOCK = threading.Lock()
_SESSIONS: weakref.WeakSet = weakref.WeakSet()
_BY_HASH: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # Gradio's session hash -> Session
_BY_HASH_LOCK = threading.Lock()
_WORKDIRS: set[Path] = set()  # every session folder not yet removed


def _load_hub(name: str):
    """A hub model on a public server: its config.json first, so that a model too large for this machine is
    refused before its weights are downloaded; messages name the model, never the cache's folders."""
    from huggingface_hub import hf_hub_download

    local_only = True
    try:
        config_file = hf_hub_download(name, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached
        if not hub_reachable():
            raise ModelLoadError(f"model {name!r} is not in this server's Hugging Face cache and the hub cannot be "
                                 f"reached. Pick {EMBEDDED} or auto, or try again later") from None
        local_only = False
        try:
            config_file = hf_hub_download(name, "config.json")
        except Exception as e:  # noqa: BLE001
            log.info("config.json of %s: %s", name, e)
            raise ModelLoadError(f"model {name!r} was not found on the Hugging Face hub (or has no config.json). "
                                 "Check the name, e.g. gpt2 or distilgpt2") from None
    try:
        config = GPT2Config.from_hf(json.loads(Path(config_file).read_text(encoding="utf-8")),
                                    source=f"{name}'s config.json")
    except jaxtune.ConfigError as e:
        raise ModelLoadError(str(e)) from None
    except (ValueError, TypeError, AttributeError):
        raise ModelLoadError(f"{name}'s config.json is not a GPT-2 configuration jaxtune can read") from None
    _check_parameters(config, name)
    try:
        snapshot = hub_snapshot(name, local_only=local_only)
    except Exception:  # noqa: BLE001 - the config was cached, the weights not
        if local_only and hub_reachable():
            snapshot = hub_snapshot(name, local_only=False)
        else:
            raise ModelLoadError(f"model {name!r}'s weights are not in this server's Hugging Face cache and the hub "
                                 "cannot be reached") from None
    try:
        model, tokenizer = load_directory(snapshot)
    except (ModelLoadError, jaxtune.ConfigError) as e:
        raise ModelLoadError(str(e).replace(str(snapshot), name)) from None
    model.source = f"{name} (Hugging Face hub)"
    return model, tokenizer


def _check_parameters(config: GPT2Config, name: str):
    """Refuse a model no method can train here (the method's own check comes when a run starts: `_check_memory`)."""
    n = _parameters(config)
    if n > MAX_LORA_PARAMETERS:
        raise gr.Error(f"{name} has {n / 1e6:,.0f}M parameters; this server trains models of up to "
                       f"{MAX_LORA_PARAMETERS / 1e6:,.0f}M with LoRA or QLoRA ({LORA_BYTES_PER_PARAMETER} bytes a "
                       f"parameter) and {MAX_PARAMETERS / 1e6:,.0f}M with full fine-tuning ({BYTES_PER_PARAMETER}), "
                       f"{RUN_MEMORY / 2**30:.1f} GiB for a run. Pick a smaller model, e.g. gpt2 or distilgpt2.",
                       title="Model too large")



def _shared_base(name: str, seed: int = 0):
    """Base models are read-only (training clones them), so all sessions and runs share one copy of each."""
    key = _model_cache_key(name, seed)
    with _BASES_LOCK:
        if key not in _BASES:
            while len(_BASES) >= 2:  # keep memory bounded on a small Space: drop the oldest
                _BASES.popitem(last=False)
            if PUBLIC and name not in ("auto", EMBEDDED):
                model, tokenizer = _load_hub(name)
            else:
                model, tokenizer = jaxtune.load(name, seed=seed)
            _check_parameters(model.config, name)
            _BASES[key] = model, tokenizer
        _BASES.move_to_end(key)
        return _BASES[key]


def _run_model(name: str, seed: int):
    """The registry's model loader: a copy of the shared base (the trainer writes into the model it is given). Where
    the trainer offloads the model (GPU, TPU), the copy is made in host memory, so the device never holds a second
    float32 copy of the base beside the shared one."""
    try:
        model, tokenizer = _shared_base(name, seed)
    except gr.Error as e:
        raise ModelLoadError(e.message) from None
    clone = to_host(model) if offloads_by_default() else nnx.clone(model)
    clone.source = getattr(model, "source", name)
    return clone, tokenizer


def _kept_secret(name: str) -> str:
    """A random key kept beside the runs (made on first use), so that a restarted server still reads what its pages
    stored; a fresh one for this process when the folder cannot be written."""
    path = RUNS_DIR / name
    try:
        return path.read_text().strip() or secrets.token_hex(16)
    except OSError:
        value = secrets.token_hex(16)
        try:
            RUNS_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(value)
            path.chmod(0o600)
        except OSError:
            pass
        return value


def _browser_secret() -> str:
    """The key gr.BrowserState encrypts the page's storage with. Gradio hands it to the page, so it hides the
    storage from other sites, not from its own user: the run ids in it are signed too (sign_run_id)."""
    return _kept_secret(".jaxtune-app-secret")


_RUN_ID_KEY: str | None = None


def sign_run_id(run_id: str) -> str:
    """A run id as the page stores it: with an HMAC under a key that never leaves the server, so a client can hand
    back only ids this server gave it (a run id learned elsewhere cannot be adopted through the page's storage)."""
    global _RUN_ID_KEY
    _RUN_ID_KEY = _RUN_ID_KEY or _kept_secret(".jaxtune-run-id-key")
    return f"{run_id}.{hmac.new(_RUN_ID_KEY.encode(), run_id.encode(), 'sha256').hexdigest()[:32]}"


def _signed_id(token) -> str | None:
    """The run id in a stored token, when its signature holds. A desktop (where every run is listed anyway) also
    takes a bare id, as pages stored them before ids were signed."""
    if not isinstance(token, str):
        return None
    run_id, dot, _ = token.partition(".")
    if dot:
        return run_id if hmac.compare_digest(sign_run_id(run_id), token) else None
    return None if PUBLIC else token


enable_compilation_cache()  # a restarted app loads its compiled steps instead of compiling them again
REGISTRY = Registry(RUNS_DIR, concurrent=CONCURRENT_RUNS, max_seconds=MAX_TRAIN_SECONDS,
                    orphan_seconds=ORPHAN_SECONDS, size_cap=RUNS_SIZE_CAP, load_model=_run_model)


class Session:
    """One browser session: its data beyond the table, the runs it knows (the browser's, or those an API client
    started), the run the train panel shows (`watch`) and the one Export, Resume and Delete act on (`pick`)."""

    def __init__(self):
        self.rest: list[list[str]] = []  # loaded pairs after the ones the table shows: kept here, not in the page
        self.source = ""  # the file they came from
        self.ids: list[str] = []  # this browser's runs, oldest first
        self.watch: str | None = None
        self.pick: str | None = None
        self.table_ids: list[str] = []  # the runs table's rows
        self.sent: dict = {}  # what the page already shows, so a poll sends only what changed
        self.zips: dict = {}  # the zips made for Export: (run id, kind, model file's time) -> path
        self.view_lock = threading.RLock()  # one view at a time, and no pick while one is made (see `_view`)
        self.chose: dict = {}  # what the page last chose by itself for Try's run A and Evaluate's runs
        self.attached = False  # this browser's stored run ids were read
        self.export_kind = "adapter"  # what Export gives for a LoRA run: the adapter, or the merged model
        self.command_for: str | None = None  # the run Show command's panel shows
        self.stop_note_for: str | None = None  # the run Stop's note is about
        self.eval_reports: list[str] = []  # the last evaluation's report files
        self.delete_asked: tuple[str, float] | None = None  # (run id, when): the page's Delete, pressed once
        self.example_asked: float | None = None  # when the page's Load example data was pressed over rows of its own
        self.undo: tuple | None = None  # (table rows, rest, source, rows the upload showed): for Undo upload
        self.undo_asked: float | None = None  # when Undo upload was pressed over edits made since the upload
        self._workdir: Path | None = None
        _SESSIONS.add(self)

    @property
    def workdir(self) -> Path:
        """The session's folder (exported zips), made when first needed, removed by close(), when the session is
        garbage-collected and at exit."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="jaxtune-app-"))
            _WORKDIRS.add(self._workdir)
            self._remove = weakref.finalize(self, _remove_dir, self._workdir)
        return self._workdir

    def adopt(self, tokens):
        """The runs a page's storage names (signed ids, see sign_run_id)."""
        for run_id in map(_signed_id, tokens or ()):
            if run_id is not None and run_id not in self.ids and REGISTRY.get(run_id) is not None:
                self.ids.append(run_id)

    def close(self):
        if self._workdir is not None:
            self._remove()


def _remove_dir(directory: Path):
    shutil.rmtree(directory, ignore_errors=True)
    _WORKDIRS.discard(directory)


def _session(session, request=None) -> Session:
    """The session's object, made on its first call; known by Gradio's session hash, for `_unload`. A page's first
    events (its load events, the first poll, a click right after a reload) can all start before any of them has
    stored the page's state: they share one object through the hash, or each would make its own and the last to
    finish would drop what the others kept (a first Load example press, so the second asked again)."""
    key = getattr(request, "session_hash", None)
    if isinstance(session, Session):
        if key:
            _BY_HASH[key] = session
        return session
    with _BY_HASH_LOCK:
        session = (_BY_HASH.get(key) if key else None) or Session()
        if key:
            _BY_HASH[key] = session
    return session


def _unload(request: gr.Request):
    """The tab was closed: its folder goes now (Gradio drops a closed session's state only an hour later). Its runs
    go on: they belong to the server (on a Space the orphan limit stops them)."""
    session = _BY_HASH.pop(getattr(request, "session_hash", None) or "", None)
    if session is not None:
        session.close()


def _close(session):
    if isinstance(session, Session):
        session.close()


def shutdown():
    """Stop every active run (each writes a checkpoint and its model, so Resume continues it), remove every session
    folder and Gradio's cached files of this app (uploads, exported zips): atexit, and SIGTERM/SIGINT through
    `_on_signal`. (Gradio deletes its cache in the server's own shutdown too, but that is cut short when the server
    does not stop within 5 s.)"""
    active = [run for run in REGISTRY.list() if run.status in ACTIVE]
    for run in active:
        REGISTRY.stop(run.id, "the server was shut down")
    deadline = time.time() + 30
    while any(run.status in ACTIVE for run in active) and time.time() < deadline:
        time.sleep(0.2)
    for directory in list(_WORKDIRS):
        _remove_dir(directory)
    try:
        from gradio.route_utils import delete_files_created_by_app

        delete_files_created_by_app(demo, age=None)
    except Exception as e:  # noqa: BLE001 - Gradio's internals may move; the folders above are the app's own
        log.warning("could not delete Gradio's cached files: %s", e)


atexit.register(shutdown)


def _on_signal(signum, frame):
    shutdown()
    raise KeyboardInterrupt  # launch() then closes the server, whose shutdown deletes Gradio's cache, and returns

# ---------------------------------------------------------------------------------------------- data
def _table_rows(table) -> list[list[str]]:
    """The table's rows as [instruction, response] text (extra columns ignored, empty cells ""), refusing what a
    table cannot hold and more rows or text than this server takes."""
    if table is None:
        return []
    if isinstance(table, pd.DataFrame):
        data = table.values.tolist()
    else:
        data = table.get("data") if isinstance(table, dict) else table
    if not isinstance(data, (list, tuple)):
        raise gr.Error("The table must be a list of [instruction, response] rows.", title="Table")
    _check_rows(len(data))
    rows, chars = [], 0
    for n, row in enumerate(data, start=1):
        if not isinstance(row, (list, tuple)):
            raise gr.Error(f"Row {n} of the table is not a row of cells.", title="Table")
        cells = []
        for cell in (list(row[:2]) + [None, None])[:2]:
            if cell is None or (isinstance(cell, float) and math.isnan(cell)):
                cell = ""
            elif isinstance(cell, bool) or not isinstance(cell, (str, int, float)):
                raise gr.Error(f"Row {n} of the table holds {type(cell).__name__}, not text.", title="Table")
            cells.append(cell if isinstance(cell, str) else str(cell))
            chars += len(cells[-1])
            bad = invalid_character(cells[-1])
            if bad is not None:
                raise gr.Error(f"Row {n}'s {('instruction', 'response')[len(cells) - 1]} holds a character that is not "
                               f"valid text at position {bad + 1} (an unpaired surrogate, U+D800-U+DFFF); fix or "
                               "remove it.", title="Table")
        rows.append(cells)
    if chars > MAX_TEXT_CHARS:
        raise gr.Error(f"The table holds {chars:,} characters; this server takes at most {MAX_TEXT_CHARS:,}. "
                       "Use fewer or shorter pairs.", title="Too much text")
    return rows


def _check_rows(n: int, what: str = "The data has"):
    if n > MAX_ROWS:
        raise gr.Error(f"{what} {n:,} rows; this server takes at most {MAX_ROWS:,} (JAXTUNE_MAX_ROWS). "
                       "Use fewer rows.", title="Too many rows")


def _all_rows(table, session) -> list[list[str]]:
    """What trains: the table's rows, then the loaded pairs it does not show."""
    rows = _table_rows(table)
    if isinstance(session, Session) and session.rest:
        rows = rows + session.rest
        _check_rows(len(rows))
    return rows


def _frame(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=HEADERS)


def _data_note(session) -> str:
    if not isinstance(session, Session) or not session.rest:
        return ""
    rest = len(session.rest)
    return (f"**Showing {TABLE_ROWS:,} of {TABLE_ROWS + rest:,} pairs** from {session.source}; all are used for "
            f"training: the table's rows as you edit them, then the other {rest:,} as loaded, kept on the server "
            f"(Preview row shows any of them by number). **Use the table only** drops those {rest:,}.")


def _loaded(session: Session, rows: list[list[str]], source: str):
    """The table to send back (its first TABLE_ROWS rows) and the note; the rest stays in the session."""
    session.rest, session.source = rows[TABLE_ROWS:], source
    return _frame(rows[:TABLE_ROWS]), _data_note(session)


PAGE_CHARS = 1_000_000  # a table larger than this is not kept in the browser (localStorage holds a few MB)


@_guarded
def remember_page(table, model_name, session):
    """What a reload brings back (kept in the browser, gr.BrowserState): the table's rows, the model field, and how
    many loaded pairs beyond the table stayed on the server (a reload starts a new session without them)."""
    try:
        rows = _table_rows(table)
    except gr.Error:
        return gr.skip()
    rest = len(session.rest) if isinstance(session, Session) else 0
    source = session.source if isinstance(session, Session) else ""
    page = {"model": model_name if isinstance(model_name, str) else "auto", "rest": rest, "source": source}
    if sum(len(a) + len(b) for a, b in rows) <= PAGE_CHARS:
        page["table"] = rows
    return page


SETTINGS = ("loss_on", "precision", "method", "lora_rank", "epochs", "batch_size", "learning_rate", "max_length",
            "warmup_steps", "seed", "validation_fraction", "pack", "keep_best",  # the training settings and Try's
            "temperature", "top_p", "max_new_tokens",                               # that a reload brings back,
            "eval_source", "eval_base", "eval_max_new_tokens")                      # and Evaluate's


def remember_settings(*values) -> dict:
    """The training, Try and Evaluate settings as they are now, kept in the browser (gr.BrowserState) for a reload."""
    return dict(zip(SETTINGS, values))


def _restored_setting(name: str, value):
    """A kept setting if it is still a value the server accepts, else gr.skip() (the field keeps its default)."""
    choices = {"loss_on": LOSS_MODES, "precision": PRECISIONS, "method": METHODS, "eval_source": EVAL_SOURCES}
    try:
        if name in choices:
            return _choice(name, value, choices[name])
        if name in ("pack", "keep_best", "eval_base"):
            return _flag(name, value)
        return _number(name, value)
    except gr.Error:
        return gr.skip()


@_guarded
def restore_page(page, settings=None):
    """Page load: the table, the model field, the training, Try and Evaluate settings as they were before the reload.
    (The session is attach's to make.)"""
    kept = [_restored_setting(n, settings[n]) if isinstance(settings, dict) and n in settings else gr.skip()
            for n in SETTINGS]
    if not isinstance(page, dict) or not page:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), *kept
    rows = page.get("table")
    table = gr.skip()
    if isinstance(rows, list) and rows:
        try:
            table = _frame(_table_rows(rows))  # rows the user added beyond a loaded file's TABLE_ROWS too
        except gr.Error:
            pass
    name = page.get("model")
    model = name if isinstance(name, str) and len(name) <= 4096 else gr.skip()
    rest, source = page.get("rest"), page.get("source")
    note = ""
    if isinstance(rest, int) and rest > 0:
        note = (f"**The page was reloaded:** the table came back, but the other {rest:,} pairs loaded from "
                f"{_escape(str(source or 'the file'))} stayed with the old page. Load or upload them again to train "
                "on all of them.")
    elif "table" not in page:
        note = "**The page was reloaded:** the table was too large to keep in the browser; load your data again."
    applied = _defaults_of(model_defaults(name)) if isinstance(model, str) else gr.skip()  # see follow_model
    return table, model, note, applied, *kept


@_guarded
def load_example(session, request: gr.Request = None):
    session = _session(session, request)
    pairs = read_pairs(EXAMPLE_DATA)
    table, _ = _loaded(session, [[p.instruction, p.response] for p in pairs], EXAMPLE_DATA.name)
    return table, session


@_guarded
def load_example_in_page(table, session, request: gr.Request = None):
    """The page's Load example data: at once over an empty table, the starting rows or the example itself; over
    other rows (typed, or a file's) the first press says what would be replaced and a second within
    CONFIRM_SECONDS replaces them. (The API's /load_example loads at once.) Returns the table, the session,
    the data note and the Use-the-table-only button."""
    session = _session(session, request)
    rows = [r for r in _table_rows(table) if any(c.strip() for c in r)]
    example = [[p.instruction, p.response] for p in read_pairs(EXAMPLE_DATA)]
    asked, session.example_asked = session.example_asked, None
    if _users_rows(rows) and not (asked and time.monotonic() - asked < CONFIRM_SECONDS):
        session.example_asked = time.monotonic()
        more = len(session.rest)
        held = f"{len(rows):,} rows" + (f" (and the {more:,} loaded pairs beyond them)" if more else "")
        return (gr.skip(), session, f"**Replace the table's {held} with the example data?** Press **Load example "
                f"data** again within {CONFIRM_SECONDS} s to replace them.", gr.skip())
    frame, note = _loaded(session, example, EXAMPLE_DATA.name)
    session.undo = None
    return frame, session, note, _rest_button(session)


def _users_rows(rows: list[list[str]]) -> bool:
    """Whether the table holds rows of the user's (typed, edited or uploaded), not only what the app put there."""
    example = [[p.instruction, p.response] for p in read_pairs(EXAMPLE_DATA)]
    return rows not in ([], example[:TABLE_ROWS], [list(r) for r in zip(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES)])


def _upload_path(file) -> tuple[str, str]:
    path = file.get("path") if isinstance(file, dict) else file
    if not isinstance(path, str) or not path:
        raise gr.Error("Upload a file.", title="No file")
    name = file.get("orig_name") if isinstance(file, dict) else None
    return path, Path(name if isinstance(name, str) and name else path).name


def _read_parquet(path: str, name: str, cols: dict):
    """Parquet through pyarrow: the row count is checked from the file's footer before any row is read, and
    nothing is written to a data-set cache."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception:  # noqa: BLE001 - pyarrow's many errors all mean: not a readable Parquet file
        raise DataError(f"{name}: cannot read the Parquet file; check that it is a valid .parquet file") from None
    _check_rows(parquet.metadata.num_rows, f"{name} has")
    records = parquet.read().to_pylist()
    return [record_to_pair(r, f"{name} row {n}", **cols) for n, r in enumerate(records, start=1)]


@_guarded
def upload_file(file, instruction_column, response_column, table, session, request: gr.Request = None):
    session = _session(session, request)
    if file is None:
        return gr.skip(), gr.skip(), session
    pairs, name = _read_upload(file, instruction_column, response_column, "Your table was left as it was.")
    table, note = _loaded(session, [[p.instruction, p.response] for p in pairs], name)
    gr.Info(f"Loaded {plural(len(pairs), 'pair')} from {name}")
    return table, note, session


def upload_in_page(file, instruction_column, response_column, table, session, request: gr.Request = None):
    """The page's upload: as `upload_file`, and the upload box is emptied either way, so the next file (dropped on the
    box or on the table) is taken. A refused file is a warning rather than an error: an error would also mark the
    table, an output, as failed, and cover its rows with a badge."""
    try:
        try:
            before = [r for r in _table_rows(table) if any(c.strip() for c in r)]
        except gr.Error:
            before = []
        session = _session(session, request)
        held = (before, session.rest, session.source)
        table, note, session = upload_file(file, instruction_column, response_column, table, session, request)
        if file is None:  # the box was emptied: nothing was loaded
            return table, note, session, None
        session.undo = (*held, _table_rows(table)) if _users_rows(before) else None
        if session.undo:
            more = f" and the {len(held[1]):,} loaded pairs beyond them" if held[1] else ""
            note = (f"**The upload replaced your {plural(len(before), 'row')}{more}.** **Undo upload** brings them "
                    "back." + (f"\n\n{note}" if note else ""))
        return table, note, session, None
    except gr.Error as e:
        title = e.title or "Could not read the file"
        gr.Warning(e.message, title=title)
        note = f"⚠ **{_escape(title)}:** {_escape(e.message)}"  # stays on the page, where the warning fades
        rest = _data_note(session)  # the pairs loaded before, still beyond the table
        return gr.skip(), note + (f"\n\n{rest}" if rest else ""), session, None


def _read_upload(file, instruction_column, response_column, after: str):
    """(pairs, the file's name) of an uploaded file, within this server's limits; `after` ends each error."""
    path, name = _upload_path(file)
    cols = dict(instruction_column=_text("Instruction column", instruction_column, 200).strip() or None,
                response_column=_text("Response column", response_column, 200).strip() or None)
    if Path(path).suffix.lower() not in UPLOAD_TYPES:
        raise gr.Error(f"{name}: upload a {', '.join(UPLOAD_TYPES)} file. {after}",
                       title="Could not read the file")
    size = os.path.getsize(path)
    if MAX_UPLOAD_BYTES and size > MAX_UPLOAD_BYTES:
        raise gr.Error(f"{name} is {size / 2**20:.1f} MB; this server takes files of up to {MAX_UPLOAD_MB:g} MB "
                       "(JAXTUNE_MAX_UPLOAD_MB). Upload a smaller file.", title="File too large")
    try:
        pairs = _read_parquet(path, name, cols) if path.lower().endswith(".parquet") else read_pairs(path, **cols)
    except DataError as e:  # its messages name the file by the server's path: name it by the user's file name
        message = str(e).replace(path, name).replace(str(Path(path).parent) + os.sep, "")
        message = re.sub(r"with --(instruction|response)-column \(\w+_column= in Python\)", lambda m: f"in the "
                         f"{m[1].capitalize()} column field above the upload (or with --{m[1]}-column on the command "
                         "line)", message)
        list_ends = "\n- " in message  # a list of bad rows: what follows is a paragraph of its own, not its last item
        raise gr.Error(f"{message}\n\n{after}" if list_ends else f"{message}. {after}", title="Could not read the file")
    if not pairs:
        raise gr.Error(f"{name} holds no pairs. {after}", title="Could not read the file")
    _check_rows(len(pairs), f"{name} has")
    return pairs, name


@_guarded
def use_table_only(session):
    if isinstance(session, Session):
        session.rest, session.source = [], ""
    return "", session


def _rest_button(session):
    return gr.update(visible=isinstance(session, Session) and bool(session.rest))


@_guarded
def undo_upload(table, session, request: gr.Request = None):
    """The page's Undo upload: the table, and any loaded pairs beyond it, as they were before the last upload. Over
    edits made to the uploaded rows since, the first press says they would go and a second within CONFIRM_SECONDS
    undoes."""
    session = _session(session, request)
    if not session.undo:
        return gr.skip(), "Nothing to undo: the table is as the last load or edit left it.", session
    rows, rest, source, shown = session.undo
    asked, session.undo_asked = session.undo_asked, None
    if _table_rows(table) != shown and not (asked and time.monotonic() - asked < CONFIRM_SECONDS):
        session.undo_asked = time.monotonic()
        more = f" and the {len(rest):,} loaded pairs beyond them" if rest else ""
        return (gr.skip(), f"**The uploaded rows were edited since.** Undo upload brings back your "
                f"{plural(len(rows), 'row')}{more} and drops those edits: press **Undo upload** again within "
                f"{CONFIRM_SECONDS} s to do so.", session)
    session.rest, session.source, session.undo = rest, source, None
    return _frame(rows), _data_note(session), session


def _undo_button(session):
    return gr.update(visible=isinstance(session, Session) and bool(session.undo))


def _token_spans(ids: list[int], mask: list[int]) -> list[tuple[str, str | None]]:
    """The tokens as text, each marked when it carries loss. A character that spans tokens (an emoji is 2-4 bytes,
    each a token of its own) is shown once, over its tokens together, not as a '�' for each."""
    spans, held = [], []
    for k, (t, m) in enumerate(zip(ids, mask)):
        if t == TOKENIZER.eos_token_id:  # the appended EOS, named (decoding it gives nothing to see)
            spans.append(("<|endoftext|>", "loss" if m else None))
            continue
        held.append(t)
        text = TOKENIZER.decode(held)
        if text.endswith("\ufffd") and len(held) < 4 and k + 1 < len(ids) and ids[k + 1] != TOKENIZER.eos_token_id:
            continue  # a character not finished yet: its next byte is in the next token
        spans.append((text, "loss" if m else None))
        held = []
    return spans


@_guarded
def preview(table, row_number, max_length, loss_on, session):
    """The chosen row as the model sees it, tokens carrying loss highlighted; counts and problems. The preview
    follows the widgets as they are typed in, so an empty field takes its default and a number out of range the
    nearest allowed value; values that are no number at all are refused."""
    loss_on = _choice("Loss on", loss_on, LOSS_MODES)
    b = BOUNDS["max_length"]
    max_length = 128 if max_length is None else _number("max_length", min(max(max_length, b.lo), b.hi)
                                                        if isinstance(max_length, (int, float)) else max_length)
    row_number = typed = 1 if row_number is None else row_number
    if isinstance(row_number, (int, float)) and not isinstance(row_number, bool):
        row_number = min(max(row_number, 1), MAX_ROWS)
    row_number = _number("preview_row", row_number)
    rows = _all_rows(table, session)
    report = inspect_rows(rows, TOKENIZER, max_length=max_length, loss_on=loss_on)
    counts = f"**{report.summary()}**"
    issues = [f"- ⛔ {p}" for p in report.problems] + [f"- ⚠️ {w}" for w in report.warnings]
    problems = "\n".join(issues[:20]) + (f"\n- … and {len(issues) - 20} more" if len(issues) > 20 else "")
    if not report.pairs:
        return [("Add at least one row with an instruction and a response.", None)], counts, problems
    numbers = report.numbers
    index = next((k for k, n in enumerate(numbers) if n >= row_number), len(numbers) - 1)
    pair, e = report.pairs[index], report.encoded[index]
    spans = _token_spans(e.input_ids.tolist(), e.loss_mask.tolist())
    shown = f" · showing {pair.where}"
    if typed < 1:
        shown += " (rows are numbered from 1)"
    elif typed > len(rows):
        shown += f" (row {typed:,.0f} is past the last row, {len(rows):,})"
    elif numbers[index] != row_number:  # the row asked for is blank, or left out (a problem, said below)
        shown += (f" (row {row_number:,} is blank)" if row_number in report.blank else
                  f" (row {row_number:,} is left out: see below)")
    return spans, counts + shown, problems




# ---------------------------------------------------------------------------------------------- train
def _check_run_size(epochs: int, pairs: int, batch_size: int):
    """Refuse a run that cannot finish in the time limit at the generous rates above, before anything is built."""
    per_epoch = math.ceil(pairs / batch_size)
    if epochs * per_epoch > MAX_STEPS:
        raise gr.Error(f"{epochs:,} epochs of {pairs:,} training pairs in batches of {batch_size} is "
                       f"{epochs * per_epoch:,} steps; this server runs at most {MAX_STEPS:,} steps ({_STEPS_WHY}). "
                       f"Lower the epochs to at most {max(MAX_STEPS // per_epoch, 1):,}, or raise the batch size.",
                       title="Run too long")
    if epochs * pairs > MAX_EXAMPLES_SEEN:
        why = ("JAXTUNE_MAX_EXAMPLES_SEEN" if os.environ.get("JAXTUNE_MAX_EXAMPLES_SEEN", "").strip() else
               f"the time limit of {MAX_TRAIN_SECONDS:,} s at up to {EXAMPLES_PER_SECOND:,} examples/s")
        raise gr.Error(f"{epochs:,} epochs of {pairs:,} training pairs is {epochs * pairs:,} examples; this server "
                       f"trains on at most {MAX_EXAMPLES_SEEN:,} a run ({why}). Lower the epochs to at most "
                       f"{max(MAX_EXAMPLES_SEEN // pairs, 1):,}.", title="Run too long")


def _check_memory(config: GPT2Config, name: str, batch_size: int, asked_length: int, lora_rank: int = 0,
                  keep_best: bool = False):
    max_length = min(asked_length, config.n_positions)  # what the run would use
    need = run_bytes(config, batch_size, max_length, lora_rank, keep_best)
    if need > RUN_MEMORY:
        how = (f"LoRA rank {lora_rank}" if lora_rank else "Full fine-tuning") + (
            " keeping the best weights" if keep_best else "")
        lora = not lora_rank and run_bytes(config, batch_size, max_length, LORA_RANK, keep_best) <= RUN_MEMORY
        capped = f" (its {config.n_positions} positions; {asked_length} was asked)" if asked_length > max_length else ""
        ways = (["untick Keep the best (it holds one more copy of the trained weights)"]
                if keep_best and run_bytes(config, batch_size, max_length, lora_rank) <= RUN_MEMORY else [])
        ways += ["pick LoRA or QLoRA (8 bytes a parameter instead of 24)"] if lora else []
        ways = ", or ".join(ways + ["lower the batch size or the max length, or pick a smaller model."])
        raise gr.Error(f"{how} with batch size {batch_size} x max length {max_length}{capped} on {name} needs about "
                       f"{need / 2**30:.1f} GiB by this server's estimate; a run has {RUN_MEMORY / 2**30:.1f} GiB here. "
                       + ways[0].upper() + ways[1:], title="Too large for this machine")


def _time_limit(during: str, started: float) -> gr.Error:
    return gr.Error(f"The time limit of {MAX_TRAIN_SECONDS:,} s (JAXTUNE_MAX_TRAIN_SECONDS) was reached {during}, "
                    f"after {time.monotonic() - started:.0f} s, before the first step. Use a smaller model or fewer "
                    "pairs.", title="Time limit")


def _method(method, lora_rank) -> tuple[int, str]:
    """(TrainConfig.lora_rank, TrainConfig.quantize) for the picked method; the rank is checked only when it is used."""
    method = _choice("Method", method, METHODS)
    lora, quantize = METHODS[method]
    return (_number("lora_rank", lora_rank) if lora else 0), quantize


_STARTS: dict[tuple, str] = {}  # (page, fingerprint of its data and settings) -> the run they started
_START_LOCKS: dict[tuple, threading.Lock] = {}
_STARTS_LOCK = threading.Lock()


def _start(table, *settings, session: Session, owner: str | None):
    """Start a run, once: a second Start from the same page with the same data and settings while the first run is
    queued or training (a double click, say) shows that run rather than queueing a twin, which would repeat it to the
    bit. Requests are taken one at a time per page and fingerprint, so two clicks in flight at once start one run."""
    rows = _all_rows(table, session)
    digest = hashlib.sha256(json.dumps([settings, rows], default=str).encode()).hexdigest()
    key = (owner, digest)
    with _STARTS_LOCK:
        for k in [k for k, run_id in _STARTS.items() if not _active(REGISTRY.get(run_id))]:
            _STARTS.pop(k)
            if k != key:
                _START_LOCKS.pop(k, None)
        lock = _START_LOCKS.setdefault(key, threading.Lock())
    with lock:
        run = REGISTRY.get(_STARTS.get(key))
        if _active(run):
            gr.Info(f"{run.name} is already {run.status} on exactly "
                    "these data and settings, so it was not started twice. Change a setting to start another run.")
        else:
            _check_room(session)
            run = _start_new(table, *settings, session=session)
            _STARTS[key] = run.id
        if run.id not in session.ids:
            session.ids.append(run.id)
        session.watch = session.pick = run.id  # Export, Resume and Delete follow it too
        return run


def _active(run) -> bool:
    return run is not None and run.status in ACTIVE


def _check_room(session: Session) -> None:
    """RUNS_PER_BROWSER and MAX_QUEUED, before a run is started or resumed."""
    mine = sum(_active(r) for r in REGISTRY.list(session.ids))
    if RUNS_PER_BROWSER and mine >= RUNS_PER_BROWSER:
        raise gr.Error(f"This browser has {plural(mine, 'run')} waiting or training, as many as this server lets one "
                       "browser have (JAXTUNE_RUNS_PER_BROWSER). Stop one, or start this one when one ends.",
                       title="Too many runs")
    waiting = sum(r.status == "queued" for r in REGISTRY.list())
    if MAX_QUEUED and waiting >= MAX_QUEUED:
        raise gr.Error(f"The queue is full: {plural(waiting, 'run')} {'is' if waiting == 1 else 'are'} waiting "
                       "(JAXTUNE_MAX_QUEUED). Try again when some have trained.", title="Queue full")


def _start_new(table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup_steps, seed,
               precision, validation_fraction, pack, method, lora_rank, keep_best, session: Session):
    """Check every value, then hand the run to the registry (it queues at once and trains in its own worker)."""
    started = time.monotonic()
    # every value first: nothing is loaded, tokenized or allocated for a request that cannot run
    name = _model_name(model_name)
    loss_on = _choice("Loss on", loss_on, LOSS_MODES)
    precision = _choice("Precision", precision, PRECISIONS)
    epochs, batch_size = _number("epochs", epochs), _number("batch_size", batch_size)
    learning_rate, max_length = _number("learning_rate", learning_rate), _number("max_length", max_length)
    warmup_steps, seed = _number("warmup_steps", warmup_steps), _number("seed", seed)
    validation_fraction = _number("validation_fraction", validation_fraction)
    pack, keep_best = _flag("Pack examples", pack), _flag("Keep the best", keep_best)
    lora_rank, quantize = _method(method, lora_rank)
    if name == "auto":  # the run records the model auto chose, so that its config.yaml repeats it on any machine
        name = _auto_model()
    try:
        tcfg = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, max_length=max_length,
                           loss_on=loss_on, seed=seed, warmup_steps=warmup_steps, dtype=precision, pack=pack,
                           max_steps=MAX_STEPS, lora_rank=lora_rank, quantize=quantize)
    except ValueError as e:
        raise gr.Error(str(e), title="Cannot train with these settings")
    report = inspect_rows(_all_rows(table, session), TOKENIZER, max_length=max_length, loss_on=loss_on)
    if report.problems:
        raise gr.Error("Fix these rows first:\n" + "\n".join(report.problems[:10]), title="Data problems")
    if not report.pairs and report.dropped:
        said = [w for w in report.warnings if "nothing of the response" in w]
        raise gr.Error("No row can train: " + "; ".join(said[:3]) + (f"; and {len(said) - 3} more" if len(said) > 3
                                                                      else ""), title="No data")
    if not report.pairs:
        raise gr.Error("The table has no pairs. Add rows or load the example data.", title="No data")
    pairs = report.pairs
    lines = [report.summary()]
    if validation_fraction and len(pairs) < 4:
        lines.append(f"validation: none (a validation fraction needs at least 4 pairs; there are {len(pairs)})")
        validation_fraction = 0.0
    n_val = held_out(len(pairs), validation_fraction)
    if keep_best and not n_val:
        raise gr.Error("Keep the best weighs each step's weights by their validation loss, and this run holds no pairs "
                       "out: set a validation fraction (0.1 or more, with at least 4 pairs), or untick Keep the best.",
                       title="Cannot train with these settings")
    _check_run_size(epochs, len(pairs) - n_val, batch_size)
    if name in PRESETS:  # a known architecture: a run too large for this machine is refused before it is downloaded
        _check_memory(PRESETS[name], name, batch_size, max_length, lora_rank, keep_best)
    try:
        base, _ = _shared_base(name, seed)
    except (ModelLoadError, jaxtune.ConfigError) as e:
        raise gr.Error(str(e), title="Could not load the model")
    if time.monotonic() - started > MAX_TRAIN_SECONDS:
        raise _time_limit("while loading the model", started)
    tcfg.max_length = min(max_length, base.config.n_positions)
    _check_memory(base.config, name, batch_size, max_length, lora_rank, keep_best)
    steps = min(MAX_STEPS, epochs * math.ceil((len(pairs) - n_val) / batch_size))  # packed runs take fewer
    cfg = RunConfig(model=name, validation_fraction=validation_fraction, train=tcfg, samples=2, keep_checkpoints=2,
                    eval_every=max(1, steps // 10) if n_val else None,  # the validation curve: about 10 points
                    early_stopping=EARLY_STOPPING if keep_best else None,
                    save_every=max(25, math.ceil(steps / 5)))  # a checkpoint every fifth of the run (and on Stop)
    if n_val:
        lines.append(f"validation: {n_val} of {len(pairs)} pairs held out (seeded), evaluated every {cfg.eval_every} "
                     "steps")
    lines.append(f"time limit: {MAX_TRAIN_SECONDS:,} s for the whole run (JAXTUNE_MAX_TRAIN_SECONDS), from when it "
                 "leaves the queue: loading, compiling and training")
    label = _model_label(name)
    return REGISTRY.start(cfg, pairs, name=_unique_name(time.strftime("%m-%d %H:%M:%S ") +
                                                        ("from " if label.startswith("run ") else "") + label),
                          note="\n".join(lines))


def _unique_name(name: str) -> str:
    """A run name no other run in the registry has: two runs started in one second get "(2)", "(3)"..."""
    taken = {run.name for run in REGISTRY.list()}
    n = 2
    while name in taken:
        name = f"{name.rsplit(' (', 1)[0]} ({n})"
        n += 1
    return name


TRAIN_INPUTS = "table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup_steps, seed, " \
               "precision, validation_fraction, pack, method, lora_rank, keep_best"


@_guarded
def start_run(table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup_steps, seed,
              precision, validation_fraction, pack, method, lora_rank, keep_best, session, saved,
              request: gr.Request = None):
    """The page's Start: the run goes to the registry and its id into this browser's storage; the poll draws it."""
    session = _attached(session, saved, request)
    _start(table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup_steps, seed, precision,
           validation_fraction, pack, method, lora_rank, keep_best, session=session, owner=_owner(request))
    return [remember_watched(session, saved), session, *_view(session)]


@_guarded
def train_run(table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup_steps, seed,
              precision, validation_fraction, pack, method="Full fine-tuning", lora_rank=LORA_RANK, keep_best=False,
              session=None,
              request: gr.Request = None):
    """The API's train: start a run and follow it to its end (progress, plot, log). Leaving early does not stop it."""
    session = _session(session, request)
    run = _start(table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup_steps, seed,
                 precision, validation_fraction, pack, method, lora_rank, keep_best, session=session,
                 owner=_owner(request))
    shown = None
    while True:
        REGISTRY.seen([run.id])
        state = (run.status, run.step, len(run.log), len(run.history), REGISTRY.queue_text(run.id))
        if state != shown:
            shown = state
            yield _progress_html(run), _plot_frame(run), "\n".join(run.log), session
        if run.status not in ACTIVE:
            time.sleep(0.5)  # the last state again, after a pause: a client reading the stream then surely has it
            yield _progress_html(run), _plot_frame(run), "\n".join(run.log), session
            return
        time.sleep(0.3)


def _owner(request: gr.Request | None) -> str | None:
    """The page a request comes from (Gradio's session hash): two Starts from one page are one user's."""
    return getattr(request, "session_hash", None) if request is not None else None


def _target(session, run_id=None, *, what: str):
    """A run this page may act on: on a public server only this browser's own."""
    run_id = run_id if isinstance(run_id, str) and run_id else None
    run = REGISTRY.get(run_id)
    if run is None or (PUBLIC and run.id not in session.ids):
        raise _no_run(run_id, what)
    return run


def _no_run(run_id, what: str) -> gr.Error:
    """No run to act on: none named, or one that is not here (deleted, or on a Space another browser's: the same
    answer, so that an id says nothing about other people's runs)."""
    if run_id is None:
        return gr.Error(f"Pick a run to {what} in the runs table.", title="No run")
    return gr.Error(f"There is no run {run_id!r} here (deleted?). Pick a run to {what} in the runs table.",
                    title="No run")


@_guarded
def stop_run(session, request: gr.Request = None):
    """Stop the run the train panel shows: a training run stops after its step (checkpointed, model written), a
    waiting one leaves the queue."""
    session = _session(session, request)
    run = REGISTRY.get(session.watch)
    if run is None or run.status not in ACTIVE:
        live = [r for r in REGISTRY.list(session.ids) if r.status in ACTIVE]
        shown = f"{run.name}, the run shown, is {run.status}" if run is not None else "No run is shown"
        if live:
            return (f"{shown}. " + "; ".join(f"{r.name} is {r.status}" for r in live) +
                    f": pick {'it' if len(live) == 1 else 'one'} in the runs table, then press Stop.")
        return f"{shown}; no run of yours is queued or training." if run is not None else \
            "No run of yours is queued or training."
    waiting = run.status == "queued"
    REGISTRY.stop(run.id)  # the run's message says when it stopped (or that it was cancelled while it waited)
    session.stop_note_for = run.id
    return f"Cancelling {run.name}: it was waiting in the queue." if waiting else \
        f"Stopping {run.name} after the current step (a checkpoint and the model are written)…"


@_guarded
def stop_by_id(run_id, session, request: gr.Request = None):
    """The API's stop for any run this client may act on (on a desktop any run, on a Space its own)."""
    session = _session(session, request)
    run = _target(session, run_id, what="stop")
    return "stopping" if REGISTRY.stop(run.id) else f"{run.name} is {run.status}"


@_guarded
def resume_run(run_id, session, request: gr.Request = None):
    session = _session(session, request)
    run = _target(session, run_id, what="resume")
    if not _active(run):
        _check_room(session)
    try:
        REGISTRY.resume(run.id)
    except RunDirError as e:
        further = "" if run.status != "finished" else (  # what to do instead: a public server reads no folder
            " all of its steps. To train longer, start a new run with more epochs." if PUBLIC else
            f" all of its steps. To train it further, start a new run from its model: put its folder ({run.dir}) in "
            "the Model field.")
        raise gr.Error(str(e) + further, title="Cannot resume")
    if run.id not in session.ids:
        session.ids.append(run.id)
    session.watch = session.pick = run.id
    return f"Resuming {run.name} from its last checkpoint."


def resume_in_page(run_id, session, request: gr.Request = None):
    """The page's Resume: as `resume_run`, and a refusal stays in the note beside the buttons (its advice, such as a
    folder to copy into the Model field, would fade with the toast)."""
    try:
        return resume_run(run_id, session, request)
    except gr.Error as e:
        title = e.title or "Cannot resume"
        gr.Warning(e.message, title=title)
        return f"⚠ **{_escape(title)}:** {_escape(e.message)}"


def remember_watched(session, saved):
    """This browser's run ids with the run the page now shows (a resumed one started elsewhere, say), so that a
    reload or a reopened tab finds it again."""
    saved = [i for i in (saved if isinstance(saved, list) else []) if _signed_id(i) is not None]
    watch = session.watch if isinstance(session, Session) else None
    return saved + [sign_run_id(watch)] if watch and watch not in map(_signed_id, saved) else saved


@_guarded
def delete_run(run_id, session, request: gr.Request = None):
    session = _session(session, request)
    run = _target(session, run_id, what="delete")
    try:
        REGISTRY.delete(run.id)
    except RunDirError as e:
        raise gr.Error(str(e), title="Cannot delete")
    with _TUNED_LOCK:
        for key in [k for k in _TUNED if k[0] == run.id]:
            _TUNED.pop(key)
    if run.id in session.ids:
        session.ids.remove(run.id)
    session.pick = None if session.pick == run.id else session.pick  # the next view picks another, and the train
    return f"Deleted {run.name} and its folder."  # panel follows it there (see _make_view)



@_guarded
def delete_in_page(run_id, session, request: gr.Request = None):
    """The page's Delete takes two presses: the first says what would go, the second (on the same run, within
    CONFIRM_SECONDS) deletes it. (The API's /delete deletes at once: its caller names the run.)"""
    session = _session(session, request)
    run = _target(session, run_id, what="delete")
    if _active(run):  # said now, not after the confirming press; in the note, which an error would have left holding
        said = f"{run.name} is {run.status}; press Stop first, then Delete."  # the last note, under an 'Error' badge
        gr.Warning(said, title="Cannot delete")
        session.delete_asked = None
        return f"⚠ **Cannot delete:** {_escape(said)}"
    asked, session.delete_asked = session.delete_asked, None
    if asked and asked[0] == run.id and time.monotonic() - asked[1] < CONFIRM_SECONDS:
        return delete_run(run.id, session, request)
    session.delete_asked = (run.id, time.monotonic())
    return (f"Delete **{_escape(run.name)}** and its folder (model, checkpoints, log)? This cannot be undone. Press "
            f"**Delete** again within {CONFIRM_SECONDS} s to delete it.")


@_guarded
def pick_run(run_id, session, request: gr.Request = None):
    """A run chosen in the runs list: the train panel shows it, and Export, Resume and Delete act on it."""
    session = _session(session, request)
    with session.view_lock:
        if isinstance(run_id, str) and REGISTRY.get(run_id) is not None and (not PUBLIC or run_id in session.ids):
            session.pick = session.watch = run_id
        return [session, *_view_after_pick(session)]


def _view_after_pick(session: Session) -> list:
    """The view after a pick (made under the page's view lock, with the pick); the next poll then sends everything
    again. A poll made before the pick can still reach the page after it (its reply is on its way), with the old run's
    panel or Export choice: the full poll puts the pick back."""
    with session.view_lock:
        view = _view(session)
        session.sent.clear()
        return view


@_guarded
def pick_row(session, evt: gr.SelectData, request: gr.Request = None):
    session = _session(session, request)
    row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    with session.view_lock:
        if isinstance(row, int) and 0 <= row < len(session.table_ids):
            session.pick = session.watch = session.table_ids[row]
        return [session, *_view_after_pick(session)]


@_guarded
def show_command(session, request: gr.Request = None):
    """The run's config.yaml and the command line that repeats it."""
    session = _session(session, request)
    run = REGISTRY.get(session.watch) or REGISTRY.get(session.pick)
    if run is None or (PUBLIC and run.id not in session.ids):
        raise gr.Error("Start a run or pick one in the runs table first.", title="No run")
    text = (run.dir / "config.yaml").read_text(encoding="utf-8")
    train = (yaml.safe_load(text) or {}).get("train") or {}
    flags = (f" --lora-rank {train['lora_rank']}" if train.get("lora_rank") else "") + \
        (f" --quantize {train['quantize']}" if train.get("quantize", "none") != "none" else "")
    command = f"python -m jaxtune train --config {run.dir / 'config.yaml'} --output runs-cli/{run.id}{flags}"
    session.command_for = run.id if run.id == session.watch else None
    return gr.update(value=command, visible=True), gr.update(value=text, visible=True)  # each copied on its own


@_guarded
def runs_json(session, request: gr.Request = None):
    """The API's runs list (what the runs table shows), with ids and folders."""
    session = _session(session, request)
    return [{**run.info(), "method": _method_label(run), "dir": str(run.dir)} for run in _visible(session)]


# ---------------------------------------------------------------------------------------------- the view
def _visible(session: Session):
    return REGISTRY.list(session.ids) if PUBLIC else REGISTRY.list()


def _ago(t) -> str:
    if not t:
        return ""
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s ago" if s < 90 else f"{s / 60:.0f} min ago" if s < 5400 else f"{s / 3600:.0f} h ago"


def _progress_html(run) -> str:
    if run is None:
        return ('<div class="jt-progress"><div class="jt-bar" style="width:0%"></div></div>'
                '<div class="jt-progress-text">no run shown: press Start training, or pick a run in the runs table'
                '</div>')
    total, step = run.total_steps or 0, run.step or 0
    pct = 100.0 * step / total if total else 0.0
    if run.status == "queued":
        bits = [f"{run.name}: waiting in the queue", REGISTRY.queue_text(run.id) or "starting…"]
    elif run.status in ("stopped", "failed") and not total:  # cancelled while it waited, or failed before training
        bits = [f"{run.name}: stopped: {run.message}"]
    elif run.status == "training" and not total:
        bits = [f"{run.name}: loading the model and the data"]
    else:
        bits = [f"step {step}/{total}", f"{pct:.0f}%"]
        if run.status == "training" and run.warming_up:
            bits.append("compiling the train step (or loading it from the compilation cache): the first step waits "
                        "for it")
        elif run.status == "training":
            if run.eta is not None:
                bits.append(f"ETA {_minutes(run.eta)}" + _past_the_limit(run))
            if run.tokens_per_sec:
                bits.append(f"{run.tokens_per_sec:,.0f} tokens/s")
        if run.train_loss is not None:
            bits.append(f"loss {run.train_loss:.4f}")
        bits.append(f"{run.name}: {run.status}" + (f": {run.message}" if run.status != "training" and run.message
                                                    else ""))
    return (f'<div class="jt-progress"><div class="jt-bar" style="width:{pct:.1f}%"></div></div>'
            f'<div class="jt-progress-text">{" · ".join(_escape(b) for b in bits)}</div>')


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"


def _past_the_limit(run) -> str:
    """What the time limit does to a training run whose ETA lies beyond it (said once the pace is known)."""
    limit = REGISTRY.max_seconds
    if not limit or not run.started or not run.eta or not run.total_steps:
        return ""
    left = max(0.0, run.started + limit - time.time())
    if run.eta <= left:
        return ""
    near = run.step + (run.total_steps - run.step) * left / run.eta
    return (f", past the time limit of {_minutes(limit)} (JAXTUNE_MAX_TRAIN_SECONDS): it stops in {_minutes(left)}, "
            f"near step {near:,.0f}, and keeps what it learned")


def _escape(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plot(run) -> dict:
    """The plot's data and its axes' limits. The browser lays a plot's axes out when it draws it anew (when its limits
    change) and not when only its data changes, so ticks that outgrew the space they were given, '10.85' where an empty
    plot had none, came out cut ('0.85'). Limits of whole numbers of loss around the data, and steps 0 to the run's
    planned total (10 at the least, or a short run's axis is ticked in tenths of a step), keep the ticks the same
    between redraws; the plot is redrawn only when a limit moves."""
    frame = _plot_frame(run)
    losses = frame["loss"][frame["loss"].map(math.isfinite)]
    low, high = (math.floor(losses.min()), math.ceil(losses.max())) if len(losses) else (0, 12)
    total = run.total_steps if run is not None and run.total_steps else None
    return gr.update(value=frame, y_lim=[low, max(high, low + 1)], label=_plot_label(run),
                     x_lim=[0, max(total or 0, int(frame["step"].max()), 10)])  # 10 at least: whole-step ticks


def _plot_label(run) -> str:
    """The plot's title; with Keep the best, the step whose weights the model holds when it is not the last."""
    kept = run.best_step if run is not None and run.best_step not in (None, run.step) else None
    return "Loss: train (orange), validation (blue)" + (
        "" if kept is None else f" · the model keeps step {kept}'s weights, the lowest validation loss")


def _plot_frame(run) -> pd.DataFrame:
    """Both series from the first value on: the plot fixes its colour scale from the series in its first value, so a
    validation series that appeared later would be drawn with no colour. Until the first validation point an empty
    (NaN) one holds its place; it draws nothing."""
    history = run.history if run is not None else []
    rows = [(h["step"], h["loss"], "train") for h in history]
    before = getattr(run, "initial_val_loss", None) if history else None  # the starting point, where there is one
    rows += [(0, before, "validation")] if before is not None else []
    rows += [(h["step"], h["val_loss"], "validation") for h in history if h.get("val_loss") is not None]
    if not any(r[2] == "validation" for r in rows):
        rows.append((history[0]["step"] if history else 0, float("nan"), "validation"))
    if not history:
        rows.insert(0, (0, float("nan"), "train"))
    df = pd.DataFrame(rows, columns=["step", "loss", "split"])  # typed, so the plot's axes are quantitative
    return df.astype({"step": "int64", "loss": "float64", "split": "str"})


RUN_COLUMNS = ["Name", "Model", "Method", "Pairs", "Steps", "Train loss", "Validation loss", "Status", "Started"]


@functools.lru_cache(maxsize=4096)
def _train_options(path: str, stamp: int) -> dict:
    try:
        train = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("train") or {}
        return train if isinstance(train, dict) else {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return {}


def _run_method(run) -> tuple[int, str]:
    """(lora_rank, quantize) of a run, from its config.yaml (0 and "none": full fine-tuning)."""
    path = run.dir / "config.yaml"
    try:
        train = _train_options(str(path), path.stat().st_mtime_ns)
    except OSError:
        return 0, "none"
    return int(train.get("lora_rank") or 0), str(train.get("quantize") or "none")


def _method_label(run) -> str:
    rank, quantize = _run_method(run)
    if not rank:
        return "full"
    return f"QLoRA r{rank}" if quantize == "nf4" else f"LoRA r{rank}" + ("" if quantize == "none" else
                                                                         f" ({quantize} base)")


def _model_label(name) -> str:
    """A model as the page names it: a run of this server's by its name ("run 12-06 18:24:46 tiny"), another local
    folder by its own name, a hub id or preset as it is. (A folder's server path tells a user nothing, and it pushed
    the runs table's columns off the screen.)"""
    path = Path(str(name)).expanduser()
    if not path.is_absolute() and not str(name).startswith("."):
        return str(name)  # a hub id or a preset (a relative folder is named as typed)
    where = path.resolve()
    run = next((r for r in REGISTRY.list() if r.dir.resolve() == where), None)
    return f"run {run.name}" if run is not None else path.name or str(name)


def _runs_frame(runs) -> pd.DataFrame:
    def loss(x):
        return "" if x is None else f"{x:.4f}"

    def pairs(r):  # the pairs it trains on, and those it holds out for validation
        return f"{r.pairs - r.held_out:,}" + (f" + {r.held_out:,} held out" if r.held_out else "")

    rows = [[r.name, _model_label(r.model), _method_label(r), pairs(r),
             f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step or ""),
             loss(r.train_loss), loss(r.val_loss) + (f" (step {r.best_step}, kept)" if r.best_step not in (None, r.step)
                                                     else ""),
             "cancelled" if r.status == "stopped" and not r.total_steps else r.status,  # stopped before it trained
             time.strftime("%m-%d %H:%M", time.localtime(r.created))]
            for r in runs]
    return pd.DataFrame(rows, columns=RUN_COLUMNS) if rows else \
        pd.DataFrame([["(no runs yet)", "", "", "", "", "", "", "", ""]], columns=RUN_COLUMNS)


def _label(run) -> str:
    return f"{run.name} · {run.status}"


def _model_file(run) -> Path:
    """The run's trained weights: model.safetensors, or a LoRA run's adapter_model.safetensors."""
    adapter = run.dir / "adapter_model.safetensors"
    return adapter if adapter.exists() else run.dir / "model.safetensors"


def _usable(run) -> bool:
    """A run whose model Try and Export can use: written, and not being trained (a resumed run rewrites it)."""
    return run is not None and run.saved and run.status not in ACTIVE and _model_file(run).exists()


def _no_model(run) -> str:
    """Why a run that is not `_usable` cannot be tried, evaluated or exported, and what to do."""
    if run.status in ACTIVE:
        return f"{run.name} is {run.status} and has no finished model yet; pick a run that has finished or stopped."
    return (f"{run.name} is {run.status} and has no model: it stopped before it saved one. Pick another run, or train "
            "it again with Start training.")


def _is_lora(run) -> bool:
    return run is not None and is_adapter_dir(run.dir)


EXPORT_KINDS = {"adapter": "Adapter (PEFT's files)", "merged": "Merged full model"}
ZIP_SKIP = {"run.json", "data.jsonl", "checkpoints", "train.log"}  # train.log names the server's folders


def _run_info(run) -> dict:
    """What a model card says about the run (see jaxtune.card.model_card), from its folder."""
    try:
        cfg = yaml.safe_load((run.dir / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        cfg = {}
    fraction = float(cfg.get("validation_fraction") or 0)
    n_val = held_out(run.pairs, fraction)  # from the config: run.json before 'held_out' did not say it
    return {"base_model": cfg.get("model") or run.model, "config": cfg, "pairs": run.pairs - n_val,
            "validation_pairs": n_val, "steps": run.step, "final_loss": run.train_loss, "val_loss": run.val_loss,
            "best_step": run.best_step}


def _merged_dir(run, session: Session) -> Path:
    """A LoRA run's merged full model in Hugging Face layout: the run's merged/ when it was written with this
    adapter (RunConfig.merge), else merged here once per adapter file (jaxtune.lora.merge) and saved with its card."""
    if (own := merged_beside(run.dir)) is not None:
        return own
    adapter_time = _model_file(run).stat().st_mtime_ns
    folder = session.workdir / run.id / f"merged-{adapter_time}"
    if not (folder / "model.safetensors").exists():
        model, tokenizer = _tuned(run)
        jaxtune.save(merge(model), tokenizer, folder, run_info=_run_info(run))
    return folder


def _export_kind(kind) -> str:
    return _choice("Export", kind, EXPORT_KINDS) if kind not in (None, "") else "adapter"


def _zip(run, session: Session, kind: str = "adapter") -> str:
    """The run's model as a zip (no checkpoints, no bookkeeping), made once per model file and kind, kept for the
    session. A full fine-tune: its Hugging Face folder. A LoRA run: the adapter (adapter files, model card,
    tokenizer; and base/ when its base is the embedded model), or the merged full model."""
    kind = kind if _is_lora(run) else "model"
    stamp = _model_file(run).stat().st_mtime_ns
    key = (run.id, kind, stamp)
    with _ZIP_LOCKS_LOCK:  # the page's poll and a pick can ask for the same zip at once: one builds it, one waits
        lock = _ZIP_LOCKS.setdefault((id(session), run.id, kind), threading.Lock())
    with lock:
        path = session.zips.get(key)
        if path and Path(path).exists():
            return path
        path = _build_zip(run, session, kind)
        session.zips[key] = path
        return path


_ZIP_LOCKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ZIP_LOCKS_LOCK = threading.Lock()


def _build_zip(run, session: Session, kind: str) -> str:
    folder = session.workdir / run.id
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"adapter": "-adapter", "merged": "-merged"}.get(kind, "")
    path = folder / f"jaxtune-{re.sub(r'[^A-Za-z0-9._-]+', '-', run.name).strip('-')}{suffix}.zip"
    source = _merged_dir(run, session) if kind == "merged" else run.dir
    files = [(f, f.name) for f in sorted(source.iterdir())
             if f.is_file() and f.name not in ZIP_SKIP and f.name != "config.yaml" and not f.name.startswith(".")]
    config = portable_config_text(run.dir)  # the card's `--config config.yaml --output NEW_FOLDER`, merged too
    if kind == "merged":  # the run's records go with its model, as in the other zips
        files += [(run.dir / name, name) for name in ("metrics.jsonl", "samples.jsonl") if (run.dir / name).is_file()]
    if kind == "adapter" and own_base(run.dir):
        files += [(f, f"base/{f.name}") for f in sorted((run.dir / "base").iterdir())
                  if f.is_file() and not f.name.startswith(".")]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as z:
            for f, name in files:
                z.write(f, name, compress_type=zipfile.ZIP_STORED if f.suffix == ".safetensors" else zipfile.ZIP_DEFLATED)
            if config is not None:
                z.writestr("config.yaml", config, compress_type=zipfile.ZIP_DEFLATED)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return str(path)


def _export_label(run, kind: str) -> str:
    if not _is_lora(run):
        return f"Download {run.name} (.zip)"
    what = "merged model" if kind == "merged" else "adapter" + (" + its embedded base" if own_base(run.dir) else "")
    return f"Download {run.name}: {what} (.zip)"


def _picks(session: Session, shown: dict, usable: list) -> tuple:
    """(Try's run A, run B, Evaluate's runs) for new lists of usable runs: a pick the user made stays while its run
    does; one the page made by itself (or none) moves to the newest run."""
    ids = {r.id for r in usable}
    newest = [usable[0].id] if usable else []
    a, b, runs = (shown.get(k) for k in ("run_a", "run_b", "eval"))
    a, b = (v if isinstance(v, str) else None for v in (a, b))
    kept = [r for r in runs if isinstance(r, str) and r in ids] if isinstance(runs, list) else []
    runs = kept if kept or runs == [] else None  # None: the page's own choice, or every picked run is gone
    if a not in ids or a == session.chose.get("run_a"):
        a = session.chose["run_a"] = newest[0] if newest else None
    if runs is None or runs == session.chose.get("eval"):
        runs = session.chose["eval"] = newest
    return a, b if b in ids else None, runs


def _choices(choices: list, value, shown: dict | None, key: str):
    """A run picker's new choices, with its value only where that changes what the page sent with the poll: a pick
    the user makes while the poll is on its way then stays (Gradio 6 keeps a dropdown's value when only its choices
    change), where sending the value back would undo it."""
    if shown is not None and key in shown and shown[key] == value:
        return gr.update(choices=choices)
    return gr.update(choices=choices, value=value)


PLOT_RESENDS = 2


def _view(session: Session, force: bool = False, shown: dict | None = None) -> list:
    """Everything the poll redraws, in VIEW's order; what the page already shows is skipped. `shown`: Try's and
    Evaluate's run pickers as the page has them (see `_picks`). One at a time per page, and picks change the session
    only between them: a poll that read the export kind before the user changed it compared what it made with what
    the pick had just sent, and sent the old kind's zip back after it."""
    with session.view_lock:
        return _make_view(session, force, shown)


def _make_view(session: Session, force: bool, shown: dict | None) -> list:
    runs = _visible(session)
    by_id = {r.id: r for r in runs}
    usable = [r for r in runs if _usable(r)]
    if session.pick not in by_id:
        session.pick = usable[0].id if usable else (runs[0].id if runs else None)
    if session.watch is not None and REGISTRY.get(session.watch) is None:  # the run shown was deleted: the panel
        session.watch = session.pick  # shows the run now picked (a new page shows none until it starts or picks one)
    watched = REGISTRY.get(session.watch)
    picked = by_id.get(session.pick)
    training = [r for r in runs if r.status == "training" and r.id in session.ids or r.id == session.watch and
                r.status in ACTIVE]
    session.table_ids = [r.id for r in runs]
    export = _zip(picked, session, session.export_kind) if _usable(picked) else None
    if picked is None:
        note = "No runs yet."
    elif _usable(picked):
        note = f"Export, Resume and Delete act on **{picked.name}** ({picked.status} {_ago(picked.ended)})."
    else:
        note = f"**{picked.name}** is {picked.status}" + (
            "; its model is being trained, so Export waits." if picked.saved and picked.status in ACTIVE else
            " and has no model to export yet." if picked.status in ACTIVE else
            " and has no model: it stopped before it saved one. Start training runs it again.")
    if training:
        others = [r for r in training if r is not picked]  # the picked run's status is said above
        note += "".join(f" **{r.name}** is {r.status};" for r in others) + \
            " Try and Export use runs that have a model (finished or stopped)" + \
            (f" (now **{picked.name}**)." if _usable(picked) else ".")
    choices = [(_label(r), r.id) for r in runs]
    try_choices = [(_label(r), r.id) for r in usable]
    picks = _picks(session, shown or {}, usable)
    views = {
        "progress": (_progress_html(watched), None),
        "plot": ((session.watch, len(watched.history) if watched else 0, watched and watched.best_step),
                 lambda: _plot(watched)),
        "log": ((session.watch, len(watched.log) if watched else 0), lambda: "\n".join(watched.log) if watched else ""),
        "table": ([(r.id, r.status, r.step, r.train_loss, r.val_loss, r.best_step) for r in runs],
                  lambda: _runs_frame(runs)),
        "pick": ((tuple(choices), session.pick), lambda: gr.update(choices=choices, value=session.pick)),
        "try": (tuple(try_choices), lambda: (_choices(try_choices, picks[0], shown, "run_a"),
                                             _choices(try_choices, picks[1], shown, "run_b"))),
        "eval": (tuple(try_choices), lambda: _choices(try_choices, picks[2], shown, "eval")),
        "export": ((export, _is_lora(picked)), lambda: (
            gr.update(value=export, interactive=export is not None,
                      label=_export_label(picked, session.export_kind) if export else "Download the picked run (.zip)"),
            gr.update(visible=_is_lora(picked)))),
        "note": (note, None),
    }
    out = []
    for key, (signature, make) in views.items():
        same = not force and session.sent.get(key) == signature
        if key == "plot":  # the plot drops data that reaches it while it renders or before it is mounted (a reload,
            # the last steps of a short run): sent again on the next PLOT_RESENDS polls after it changes
            resends = session.sent.get("plot-resends", 0)
            session.sent["plot-resends"] = PLOT_RESENDS if not same else max(resends - 1, 0)
            same = same and not resends
        session.sent[key] = signature
        value = signature if make is None else None
        if same:
            out.extend([gr.skip()] * (2 if key in ("try", "export") else 1))
        elif key in ("try", "export"):
            out.extend(make())
        else:
            out.append(value if make is None else make())
    # Show command's panel, while it shows a run the train panel no longer shows, hides; Stop's note, once its run
    # has stopped, goes (the progress line says how it ended)
    stale = session.command_for is not None and session.command_for != session.watch
    session.command_for = None if stale else session.command_for
    out.extend([gr.update(value="", visible=False)] * 2 if stale else [gr.skip()] * 2)
    stopping = REGISTRY.get(session.stop_note_for) if session.stop_note_for else None
    if session.stop_note_for and (stopping is None or stopping.status not in ACTIVE):
        session.stop_note_for = None
        out.append("")
    else:
        out.append(gr.skip())
    return out


def _attached(session, saved, request) -> Session:
    """The page's session, and on its first call this browser's runs: the train panel shows the live one, or the
    newest. (The load event and the first poll may come in either order.)"""
    session = _session(session, request)
    if not session.attached:
        session.attached = True
        session.adopt(saved if isinstance(saved, list) else [])
        mine = REGISTRY.list(session.ids)
        live = [r for r in mine if r.status in ACTIVE]
        session.watch = session.watch or ((live or mine)[0].id if (live or mine) else None)
        session.pick = session.pick or session.watch  # Export, Resume and Delete act on it, as after Start
    return session


@_guarded
def attach(saved, session, request: gr.Request = None):
    """Page load (and reload)."""
    session = _attached(session, saved, request)
    return [session, *_view(session, force=True)]


@_guarded
def poll(session, saved, run_a=None, run_b=None, eval_runs=None, request: gr.Request = None):
    """Every second: tell the registry this page is open (the orphan rule) and redraw what changed. Try's and
    Evaluate's run pickers as they are now come along, so that a new run in their lists keeps what the user picked."""
    session = _attached(session, saved, request)
    REGISTRY.seen(session.ids)
    return [session, *_view(session, shown={"run_a": run_a, "run_b": run_b, "eval": eval_runs})]


# ---------------------------------------------------------------------------------------------- try
def _tuned(run):
    """A finished run's model, loaded from its folder (a few kept in memory)."""
    key = (run.id, _model_file(run).stat().st_mtime_ns)
    with _TUNED_LOCK:
        if key not in _TUNED:
            while len(_TUNED) >= TUNED_CACHE:
                _TUNED.popitem(last=False)
            _TUNED[key] = load_adapter(run.dir, load_base=_adapter_base) if _is_lora(run) else load_directory(run.dir)
        _TUNED.move_to_end(key)
        return _TUNED[key]


def _adapter_base(name: str):
    """The base a LoRA run's adapter names: its own base/ folder (an absolute path by then), a local folder on a
    desktop, or a hub model, cloned from the shared copy (the adapters are attached to the model in place)."""
    path = Path(name)
    if path.is_absolute() and path.is_dir() or not PUBLIC and path.is_dir():
        return load_directory(path)
    return _run_model(name, 0)


def _run_base(run) -> tuple[str, int]:
    """The base model a run started from: its model name and seed (the embedded model's weights depend on it)."""
    try:
        cfg = yaml.safe_load((run.dir / "config.yaml").read_text(encoding="utf-8")) or {}
        return str(cfg.get("model") or run.model), int((cfg.get("train") or {}).get("seed") or 0)
    except (OSError, ValueError, yaml.YAMLError):
        return run.model, 0


@_guarded
def try_models(instruction, temperature, top_p, max_new_tokens, model_name, run_a=None, run_b=None, session=None,
               request: gr.Request = None):
    """The API's /generate: the base model's answer and up to two runs' (see `_answers`), streamed, as text."""
    for texts, _ in _answers(instruction, temperature, top_p, max_new_tokens, model_name, run_a, run_b, session,
                             request):
        yield texts


@_guarded
def try_in_page(instruction, temperature, top_p, max_new_tokens, model_name, run_a=None, run_b=None, session=None,
                request: gr.Request = None):
    """The page's Try: the same answers, each box headed by the name of the model that answers in it."""
    for texts, labels in _answers(instruction, temperature, top_p, max_new_tokens, model_name, run_a, run_b, session,
                                  request):
        yield texts if labels is None else tuple(gr.update(value=v, label=label) for v, label in zip(texts, labels))


def _answers(instruction, temperature, top_p, max_new_tokens, model_name, run_a, run_b, session, request):
    """The base model and up to two runs that have a model (finished or stopped) answer the same instruction side by
    side (streamed): (the three texts, the three boxes' labels or None). With no run chosen, run A is this session's
    newest such run."""
    yield ("", "", ""), None  # the previous answers go at once: should this prompt be refused or fail, none stays
    instruction = _text("Instruction", instruction, MAX_INSTRUCTION_CHARS)
    if not instruction.strip():
        raise gr.Error("Type an instruction first.", title="No instruction")
    kw = dict(temperature=_number("temperature", temperature), top_p=_number("top_p", top_p),
              max_new_tokens=_number("max_new_tokens", max_new_tokens))
    name = _model_name(model_name)
    session = _session(session, request)
    chosen = []
    for which, value in (("run A", run_a), ("run B", run_b)):
        run = REGISTRY.get(value) if isinstance(value, str) and value else None
        if run is not None and PUBLIC and run.id not in session.ids:
            run = None
        if run is None and isinstance(value, str) and value:
            raise gr.Error(f"There is no run {value[:40]!r} for {which} (deleted?). Pick one of the runs listed, or "
                           "leave it empty for your newest.", title="No such run")
        chosen.append(run)
    if chosen[0] is None and not (isinstance(run_a, str) and run_a):
        mine = [r for r in REGISTRY.list(session.ids) if _usable(r)]
        chosen[0] = mine[0] if mine else None
    texts = ["", "", ""]
    streams = []
    base_name, seed = _run_base(chosen[0]) if chosen[0] is not None else (name, 0)
    try:
        base, tokenizer = _shared_base(base_name, seed)
    except (ModelLoadError, jaxtune.ConfigError) as e:
        raise gr.Error(str(e), title="Could not load the model")
    streams.append((0, jaxtune.stream(base, tokenizer, instruction, **kw)))
    for i, run in enumerate(chosen, start=1):
        if run is None and i == 1:
            active = [r for r in REGISTRY.list(session.ids) if r.status in ACTIVE]
            texts[i] = (f"(no run has a model yet: {active[0].name} is {active[0].status}; pick it here once it "
                        "finishes)" if active else "(train a model in step 2 first)")
        elif run is None:
            texts[i] = ""
        elif not _usable(run):
            texts[i] = (f"({run.name} is {run.status}: pick a run that has finished or stopped)"
                        if run.status in ACTIVE else f"({run.name} has no model)")
        else:
            model, tok = _tuned(run)
            streams.append((i, jaxtune.stream(model, tok, instruction, **kw)))
    labels = [f"Base model: {_model_label(base_name)}"] + [f"Run {ab}" + (f": {run.name}" if run is not None else "")
                                             for ab, run in zip("AB", chosen)]  # which answered what, by name
    yield tuple(texts), labels  # the notes on runs that cannot answer
    while streams:  # take turns, so the answers grow side by side
        for item in list(streams):
            i, it = item
            try:
                texts[i] = next(it)
            except StopIteration:
                streams.remove(item)
                continue
            except ValueError as e:  # the library's own message: the prompt does not fit the model
                raise gr.Error(f"{e}.", title="Cannot generate")
        yield tuple(texts), labels
    yield tuple(t or "(empty response)" if i == 0 or chosen[i - 1] is not None and _usable(chosen[i - 1]) else t
                for i, t in enumerate(texts)), labels



# ---------------------------------------------------------------------------------------------- evaluate
EVAL_SOURCES = {"split": "Validation split of the data", "held-out": "Bundled held-out pairs", "upload": "Upload"}
SUMMARY_COLUMNS = ["Model", "Val loss", "Perplexity", "ROUGE-L", "Exact match", "Stop rate", "Mean length (tokens)"]


def _eval_pairs(source, file, instruction_column, response_column, table, validation_fraction, seed, max_length,
                loss_on, session, runs=()) -> tuple[list, str]:
    """(held-out pairs, what they are) for Evaluate: the split the first picked run held out (its own data.jsonl,
    fraction and seed, whatever the page holds now), with no run the split a run of the page's settings would hold
    out (`jaxtune.runs.split_validation`), the bundled file, or an upload (read like the data's)."""
    if source == "split" and runs:
        split = jaxtune.evaluate.run_pairs(runs[0].dir)
        if split is None or split[1] is None:
            raise gr.Error(f"The data of run {runs[0].name} is not on this server any more, so the pairs it held out "
                           "are not known. Pick the bundled held-out pairs or an upload.", title="No validation split")
        if not split[1]:
            raise gr.Error(f"Run {runs[0].name} held no pairs out (its validation fraction was 0): it trained on all "
                           "of its data. Pick the bundled held-out pairs or an upload.", title="No validation split")
        return split[1], split[2].replace("the run", runs[0].name, 1)
    if source == "split":
        fraction = _number("validation_fraction", validation_fraction)
        seed = _number("seed", seed)
        if not fraction:
            raise gr.Error("The validation fraction in step ② is 0, so the data has no validation split. Set it "
                           "(a run with it never trains on those pairs), or pick the bundled held-out pairs or an "
                           "upload.", title="No validation split")
        report = inspect_rows(_all_rows(table, session), TOKENIZER, max_length=_number("max_length", max_length),
                              loss_on=_choice("Loss on", loss_on, LOSS_MODES))
        if report.problems:
            raise gr.Error("Fix these rows first:\n" + "\n".join(report.problems[:10]), title="Data problems")
        if len(report.pairs) < 4:
            raise gr.Error(f"A validation split needs at least 4 pairs; the data has {len(report.pairs)}. Add pairs, "
                           "or pick the bundled held-out pairs or an upload.", title="No validation split")
        held = split_validation(report.pairs, fraction, seed)[1]
        return held, (f"the validation split: {len(held)} of {len(report.pairs)} pairs (fraction {fraction:g}, seed "
                      f"{seed}), the pairs a run with these settings holds out")
    if source == "held-out":
        return read_pairs(HELD_OUT_DATA), HELD_OUT_DATA.name
    if file is None:
        raise gr.Error("Upload a file of held-out pairs first (or pick another source).", title="No file")
    pairs, name = _read_upload(file, instruction_column, response_column, "Pick another file.")
    report = inspect_rows(pairs, TOKENIZER, max_length=1024)
    if report.problems:
        raise gr.Error(f"{name}: fix these rows first:\n" + "\n".join(report.problems[:10]), title="Data problems")
    return report.pairs, name


def _eval_models(include_base, run_ids, model_name, seed, session) -> tuple[list, str, int]:
    """([(label, run or None)], base name, base seed): the base first, then the picked finished runs. The base is the
    model the first picked run started from (the model field's otherwise)."""
    include_base = _flag("Base model", include_base)
    if run_ids is None:
        run_ids = []
    if isinstance(run_ids, str):
        run_ids = [run_ids]
    if not isinstance(run_ids, (list, tuple)) or not all(isinstance(i, str) for i in run_ids):
        raise gr.Error(f"Runs must be a list of run ids; got {_shown(run_ids)}.", title="Runs")
    run_ids = list(dict.fromkeys(run_ids))
    if len(run_ids) > MAX_EVAL_RUNS:
        raise gr.Error(f"{len(run_ids)} runs were picked; Evaluate compares at most {MAX_EVAL_RUNS} at once. Pick "
                       "fewer.", title="Too many runs")
    runs = []
    for run_id in run_ids:
        run = REGISTRY.get(run_id)
        if run is None or (PUBLIC and run.id not in session.ids):
            raise gr.Error(f"Run {_shown(run_id)} is not one of the runs listed here; pick finished runs in the list.",
                           title="No run")
        if not _usable(run):
            raise gr.Error(_no_model(run), title="Run not finished")
        runs.append(run)
    if not runs and not include_base:
        raise gr.Error("Pick the base model, a finished run, or both.", title="Nothing to evaluate")
    base_name, base_seed = _run_base(runs[0]) if runs else (_model_name(model_name), _number("seed", seed))
    labels = jaxtune.evaluate._labels(([f"base: {_model_label(base_name)}"] if include_base else []) +
                                      [f"{r.name}" + ("" if _method_label(r) == "full" else f" ({_method_label(r)})")
                                       for r in runs])
    models = list(zip(labels, ([None] if include_base else []) + runs))
    return models, base_name, base_seed


def _eval_progress_html(done: float, text: str) -> str:
    return (f'<div class="jt-progress"><div class="jt-bar" style="width:{100 * done:.1f}%"></div></div>'
            f'<div class="jt-progress-text">{_escape(text)}</div>')


def _summary_frame(results) -> pd.DataFrame:
    rows = [[r.model, f"{r.val_loss:.4f}", f"{r.perplexity:.4g}", f"{r.rouge_l:.3f}", f"{r.exact_match:.3f}",
             f"{r.stop_rate:.3f}", f"{r.mean_tokens:.1f}"] for r in results]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _examples_frame(results, pairs):
    rows = [[p.instruction, p.response, *(r.answers[k]["answer"] for r in results)]
            for k, p in enumerate(pairs[:TABLE_ROWS])]
    frame = pd.DataFrame(rows, columns=["Instruction", "Reference", *(r.model for r in results)])
    share = f"{60 / max(len(results), 1):.1f}%"  # the answers share the width, however long one of them is
    return gr.update(value=frame, column_widths=["18%", "22%", *[share] * len(results)])


@_guarded
def evaluate(source, file, instruction_column, response_column, table, validation_fraction, seed, max_length, loss_on,
             include_base, run_ids, max_new_tokens, model_name, session=None, request: gr.Request = None):
    """The base model and finished runs answer held-out pairs (greedy, batched) and are scored side by side:
    progress while they answer, then the summary, every answer, and the reports (eval.md, eval.json, eval.jsonl).
    An evaluation refused or failed says so in the progress line, where the last one's figures would stay looking
    current once the message fades."""
    try:
        yield from _evaluate(source, file, instruction_column, response_column, table, validation_fraction, seed,
                             max_length, loss_on, include_base, run_ids, max_new_tokens, model_name, session, request)
    except Exception as e:
        said = e.message if isinstance(e, gr.Error) else "it failed on the server: see the message"
        before = " The tables below are the evaluation before." if isinstance(session, Session) and \
            session.eval_reports else ""
        yield _eval_progress_html(0, f"⚠ Not evaluated: {said}{before}"), gr.skip(), gr.skip(), gr.skip()
        raise


def _evaluate(source, file, instruction_column, response_column, table, validation_fraction, seed, max_length, loss_on,
              include_base, run_ids, max_new_tokens, model_name, session, request):
    from jaxtune.evaluate import evaluate_model, report_warnings, training_overlap, write_reports

    session = _session(session, request)
    source = _choice("Held-out pairs", source, EVAL_SOURCES)
    max_new_tokens = _number("eval_max_new_tokens", max_new_tokens)
    models, base_name, base_seed = _eval_models(include_base, run_ids, model_name, seed, session)
    pairs, what = _eval_pairs(source, file, instruction_column, response_column, table, validation_fraction, seed,
                              max_length, loss_on, session, [run for _, run in models if run is not None])
    notes = [f"{len(pairs):,} held-out pairs: {what}"]
    if len(pairs) > MAX_EVAL_PAIRS:
        notes = [f"the first {MAX_EVAL_PAIRS:,} of {len(pairs):,} held-out pairs ({what}): this server evaluates at "
                 f"most {MAX_EVAL_PAIRS:,} a request (JAXTUNE_EVAL_MAX_PAIRS)"]
        pairs = pairs[:MAX_EVAL_PAIRS]
    notes.append(f"greedy answers of at most {max_new_tokens} new tokens")
    if len(models) > 1 and models[0][1] is None and any(_run_base(run) != (base_name, base_seed)
                                                        for _, run in models[1:]):
        notes.append(f"the base is {_model_label(base_name)}, the first run's; other runs started from other models")
    state = {"model": 0, "answered": 0, "phase": "loading", "results": [], "error": None, "done": False}
    heading = "; ".join(notes)
    ticket = object()

    def release():  # the next evaluation's turn: when this one's answering ends (or it never began)
        with _EVAL_TURN:
            _EVAL_TURNS.remove(ticket)
            _EVAL_TURN.notify_all()

    def work():
        try:
            for i, (label, run) in enumerate(models):
                state.update(model=i, answered=0, phase="loading")
                if run is None:
                    model, tokenizer = _shared_base(base_name, base_seed)
                else:
                    model, tokenizer = _tuned(run)
                state["phase"] = "loss"

                def progress(answered, total):
                    state.update(answered=answered, phase="answering")

                state["results"].append(evaluate_model(model, tokenizer, pairs, name=label, batch_size=EVAL_BATCH_SIZE,
                                                       max_new_tokens=max_new_tokens, on_progress=progress))
                state["results"][-1].trained_on = None if run is None else training_overlap(run.dir, pairs)
        except Exception as e:  # noqa: BLE001 - raised again in the request's thread
            state["error"] = e
        finally:
            state["done"] = True
            release()

    with _EVAL_TURN:
        _EVAL_TURNS.append(ticket)
    worker = threading.Thread(target=work, daemon=True, name="jaxtune-evaluate")
    try:  # a page that leaves while it waits gives its place up (the generator is closed at its yield)
        while ahead := _EVAL_TURNS.index(ticket):
            yield (_eval_progress_html(0, f"waiting: {plural(ahead, 'evaluation')} on this server "
                                          f"{'is' if ahead == 1 else 'are'} ahead of yours, and one answers at a time"
                                          f" · {heading}"), gr.skip(), gr.skip(), session)
            with _EVAL_TURN:  # until one ahead ends (or a while: the page's connection is checked at each yield)
                _EVAL_TURN.wait_for(lambda: _EVAL_TURNS.index(ticket) < ahead, timeout=5)
        worker.start()
    finally:
        if not worker.is_alive() and not state["done"]:
            release()
    shown = None
    while not state["done"]:
        i, answered, phase = state["model"], state["answered"], state["phase"]
        doing = {"loading": "loading", "loss": "validation loss", "answering": f"answered {answered} of {len(pairs)}"}
        text = f"{models[i][0]} ({i + 1} of {len(models)}): {doing[phase]} · {heading}"
        if text != shown:
            shown = text
            yield _eval_progress_html((i + answered / len(pairs)) / len(models), text), gr.skip(), gr.skip(), session
        time.sleep(0.25)
    worker.join()
    error = state["error"]
    if isinstance(error, gr.Error):
        raise error
    if isinstance(error, (ModelLoadError, jaxtune.ConfigError)):
        raise gr.Error(str(error), title="Could not load the model")
    if isinstance(error, (DataError, ValueError)):  # the library's own message (e.g. a prompt longer than the model)
        raise gr.Error(f"{error}.", title="Cannot evaluate")
    if error is not None:
        raise error
    results = state["results"]
    folder = session.workdir / f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    session.eval_reports = [str(f) for f in write_reports(results, pairs, folder, data=what,
                                                          max_new_tokens=max_new_tokens)]
    seconds = sum(r.seconds for r in results)
    warned = "".join(f" · ⚠ {line}" for line in report_warnings(results))
    done = f"{plural(len(models), 'model')} answered {plural(len(pairs), 'pair')} in {seconds:.1f} s{warned} · {heading}"
    yield _eval_progress_html(1.0, done), _summary_frame(results), _examples_frame(results, pairs), session


@_guarded
def eval_reports(session, request: gr.Request = None):
    """The last evaluation's eval.md, eval.json and eval.jsonl. (Its own event: Gradio 6 does not track files a
    generator returns, so they would outlive the app in its cache.)"""
    session = _session(session, request)
    return list(session.eval_reports)


# ---------------------------------------------------------------------------------------------- export
def _export_dir(run_id, session) -> Path:
    named = run_id if isinstance(run_id, str) and run_id else None
    run = REGISTRY.get(named)
    if named is not None and (run is None or (PUBLIC and run.id not in session.ids)):
        raise _no_run(named, "export")
    if run is None:
        mine = [r for r in REGISTRY.list(session.ids) if _usable(r)]
        run = mine[0] if mine else None
    if run is None:
        raise gr.Error("There is no tuned model yet: train one in step 2.", title="Nothing to export")
    if not _usable(run):
        raise gr.Error(_no_model(run), title="Nothing to export")
    return run


@_guarded
def export_zip(run_id=None, kind="adapter", session=None, request: gr.Request = None):
    """The API's export: the zip of a run's model (the picked run, or this session's newest finished one); for a
    LoRA run `kind` is adapter or merged."""
    kind = _export_kind(kind)
    session = _session(session, request)
    return _zip(_export_dir(run_id, session), session, kind), session  # the session goes back: its folder holds the zip


@_guarded
def pick_export(kind, session, request: gr.Request = None):
    """Adapter or merged model, at once: the download button waits, disabled, while that zip is made (`show_export`);
    it held the other kind's file until then, and a quick click downloaded it. Every view after this one makes the
    new kind's zip."""
    session = _session(session, request)
    kind = _export_kind(kind)
    with session.view_lock:
        session.export_kind = kind
        session.sent.pop("export", None)
    return session, gr.update(interactive=False, label=f"Preparing the {EXPORT_KINDS[kind].lower()} (.zip)…")


@_guarded
def show_export(session, request: gr.Request = None):
    """After `pick_export`: the view, with the download button holding the zip of the kind picked."""
    session = _session(session, request)
    return [session, *_view_after_pick(session)]


@_guarded
def push_to_hub(repo_id, token, private, run_id=None, kind="adapter", session=None, request: gr.Request = None):
    repo_id = _text("Hub repository", repo_id, 200).strip()
    token = _text("Token", token, 1000).strip()
    if "/" not in repo_id or not HUB_ID.fullmatch(repo_id):
        raise gr.Error("Give the repository as user/name (letters, digits, and . - _ between them).",
                       title="Repository name")
    if not token:
        raise gr.Error("Paste a Hugging Face token with write access.", title="Token needed")
    kind = _export_kind(kind)
    private = _flag("Private", private)
    session = _session(session, request)
    run = _export_dir(run_id, session)
    endpoint = (os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None  # a mirror, or the hub itself
    if not hub_reachable(endpoint=endpoint):
        raise gr.Error("The Hugging Face hub cannot be reached from this machine; download the zip instead.",
                       title="No network")
    if _is_lora(run) and kind == "merged":
        folder, what = _merged_dir(run, session), "merged model"
    else:
        folder, what = run.dir, "LoRA adapter" if _is_lora(run) else "model"
    try:
        push(folder, repo_id, token=token, private=private, endpoint=endpoint, run_dir=run.dir,
             commit_message=f"Upload {what} tuned with jaxtune")
    except ValueError as e:  # what push refuses before it uploads anything (an adapter on a local base)
        raise gr.Error(str(e), title="Cannot push")
    except Exception as e:  # noqa: BLE001 - said by its HTTP status only; the text is logged here
        log.warning("push to %s failed: %r", repo_id, e)
        raise gr.Error(f"Upload failed: {push_error(e, repo_id)}. Check the token (it needs write access) and the "
                       "repository name, or download the zip instead.", title="Upload failed")
    return f"Uploaded the {what} to {endpoint or 'https://huggingface.co'}/{repo_id}", session


# ---------------------------------------------------------------------------------------------- page
CSS = """
.jt-progress { height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden; }
.jt-bar { height: 100%; background: linear-gradient(90deg, #f97316, #fb923c); transition: width .3s; }
.jt-progress-text { font-size: 0.9em; margin-top: 4px; color: var(--body-text-color-subdued); }
.jt-step h2 { margin-bottom: 0; }
#eval-examples [role=gridcell] span { overflow-wrap: break-word; }
@media (max-width: 560px) { #val-fraction, #pack { min-width: 100% !important; } }  /* a row each on a phone */
#pairs-table thead th, #pairs-table thead th * { word-break: keep-all; overflow-wrap: normal; }  /* not 'Instructio/n' */
"""


# The pairs table would import a CSV dropped on it by itself: replacing the rows without a word, headers included, and
# past every check the upload makes. A file dropped there goes to the upload box instead, the one path that reads,
# checks and reports files (and leaves the table as it was when a file is refused).
HEAD = """<script>
(() => {
  const onTable = (e) => e.target instanceof Element && e.target.closest("#pairs-table");
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (e) => {
      if (!onTable(e)) return;
      e.preventDefault(); e.stopPropagation();
      if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
    }, true);
  }
  document.addEventListener("drop", (e) => {
    if (!onTable(e)) return;
    e.preventDefault(); e.stopPropagation();
    const input = document.querySelector("#upload input[type=file]");
    const files = e.dataTransfer ? e.dataTransfer.files : [];
    if (!input || !files.length) return;
    const moved = new DataTransfer();
    moved.items.add(files[0]);
    input.files = moved.files;
    input.dispatchEvent(new Event("change", {bubbles: true}));
  }, true);
})();
// The log shows its newest lines as they come (Gradio's autoscroll does not follow a value the server sends), unless
// the reader has scrolled up to older ones: then it stays where they are until they scroll back down to the end.
(() => {
  let seen = -1, atEnd = true;
  document.addEventListener("scroll", (e) => {
    const box = e.target;
    if (box instanceof Element && box.matches("#log textarea"))
      atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
  }, true);
  setInterval(() => {
    const box = document.querySelector("#log textarea");
    if (!box || box.value.length === seen) return;
    seen = box.value.length;
    if (atEnd) box.scrollTop = box.scrollHeight;
  }, 300);
})();
</script>"""


def backend_info() -> str:
    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    return f"JAX {jax.__version__} · backend **{jax.default_backend()}** · {plural(jax.device_count(), 'device')}: {devices}"


def _limits_info() -> str:
    upload = f"files of up to {MAX_UPLOAD_MB:g} MB, " if MAX_UPLOAD_BYTES else ""
    return (f"Limits here: {upload}{MAX_ROWS:,} pairs; a run stops after {MAX_TRAIN_SECONDS:,} s and may plan up to "
            f"{MAX_STEPS:,} steps; models up to {MAX_PARAMETERS / 1e6:,.0f}M parameters ("
            f"{MAX_LORA_PARAMETERS / 1e6:,.0f}M with LoRA or QLoRA).")


def _eval_limits_info() -> str:
    return (f"Limits here: the first {MAX_EVAL_PAIRS:,} pairs (JAXTUNE_EVAL_MAX_PAIRS), answers of up to "
            f"{BOUNDS['eval_max_new_tokens'].hi} new tokens (JAXTUNE_EVAL_MAX_NEW_TOKENS), {MAX_EVAL_RUNS} runs at "
            "once.")


def _runs_info() -> str:
    where = "this browser's runs" if PUBLIC else "every run in the folder"
    orphan = (f" A run whose page has been closed for {ORPHAN_SECONDS:,} s is checkpointed and stopped "
              "(JAXTUNE_ORPHAN_SECONDS)." if ORPHAN_SECONDS else " Runs go on when the page is closed or reloaded.")
    return (f"Runs are kept on the server{'' if PUBLIC else f' in `{RUNS_DIR}`'}; the table lists {where}. Pick one to "
            f"watch it, export it, resume it from its last checkpoint or delete it.{orphan}")


def _widget(name: str, **kw):
    b = BOUNDS[name]
    if name in ("validation_fraction", "temperature", "top_p", "max_new_tokens"):
        return gr.Slider(b.lo, b.hi, step=kw.pop("step", b.step), **kw)
    if not b.integer:  # the learning rate: a step of 1 made 0.005 "invalid" to the browser and ArrowUp made it 1
        kw.setdefault("step", 1e-6)
    return gr.Number(minimum=b.lo, maximum=b.hi, precision=0 if b.integer else None, **kw)


def method_note(method, model_name):
    """Picking LoRA or QLoRA for the embedded model, which has random weights, says what to expect."""
    if method in METHODS and METHODS[method][0] and model_name in ("tiny", "auto") and \
            (model_name == "tiny" or _auto_model() == EMBEDDED):
        gr.Info("The embedded tiny model has random weights: adapters on a frozen random model learn little (its "
                "loss falls slowly). LoRA and QLoRA are for pretrained models such as gpt2; on tiny, use full "
                "fine-tuning.", title="LoRA on an untrained model")


def _defaults_of(d: Defaults) -> list:
    return [getattr(d, f) for f in DEFAULT_FIELDS]


def _own_values(values, applied) -> list:
    """The training fields' values that are the user's (None for the others): a field holding the default the page
    put there (`applied`, kept per page; a reload sets it to the restored model's) or nothing is not the user's."""
    if not isinstance(applied, (list, tuple)) or len(applied) != len(DEFAULT_FIELDS):
        applied = _defaults_of(model_defaults("auto"))  # what the page starts with
    return [None if value is None or value == default else value for value, default in zip(values, applied)]


def follow_model(model_name, epochs, batch_size, learning_rate, max_length, warmup_steps, applied=None):
    """A new model brings its defaults field by field: a field that is not the user's takes the new model's, a value
    the user typed stays and the line says what the default would be. Returns the fields, the line and the new
    `applied`."""
    new = model_defaults(model_name if isinstance(model_name, str) else "auto")
    own = _own_values((epochs, batch_size, learning_rate, max_length, warmup_steps), applied)
    out = [getattr(new, f) if value is None else gr.skip() for f, value in zip(DEFAULT_FIELDS, own)]
    return [*out, _defaults_note(new, own), _defaults_of(new)]


def _defaults_note(new: Defaults, values) -> str:
    """The line under the training fields: why these defaults, and the user's own values that differ from them."""
    def shown(v):  # 99,999,999 rather than 1e+08; a rate as 5e-05
        return f"{int(v):,}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"

    kept = [f"{f.replace('_', ' ')} {shown(value)} (default {shown(getattr(new, f))})"
            for f, value in zip(DEFAULT_FIELDS, values)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value != getattr(new, f)]
    return new.why + (f" Your own values were kept: {', '.join(kept)}." if kept else "")


def typed_defaults_note(model_name, epochs, batch_size, learning_rate, max_length, warmup_steps, applied=None):
    """The line again after a training field is typed in, naming the values now in the fields that are the user's."""
    new = model_defaults(model_name if isinstance(model_name, str) else "auto")
    return _defaults_note(new, _own_values((epochs, batch_size, learning_rate, max_length, warmup_steps), applied))


def build_app() -> gr.Blocks:
    defaults = model_defaults("auto")
    with _Blocks(title="jaxtune: instruction-tune GPT-2 in JAX", delete_cache=DELETE_CACHE) as demo:
        session = gr.State(None, time_to_live=4 * 3600, delete_callback=_close)
        applied = gr.State(_defaults_of(defaults))  # the defaults the page put in the training fields (follow_model)
        saved = gr.BrowserState([], storage_key="jaxtune-runs", secret=_browser_secret())
        page_state = gr.BrowserState({}, storage_key="jaxtune-page", secret=_browser_secret())
        settings_state = gr.BrowserState({}, storage_key="jaxtune-settings", secret=_browser_secret())
        timer = gr.Timer(POLL_SECONDS)
        gr.Markdown("# jaxtune\nInstruction-tune a GPT-2 model on your own instruction/response pairs, in JAX. "
                    "Work through the five steps from top to bottom.")

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown("## ① Data\nEdit the table, load the example help-desk data, or upload JSONL, JSON, CSV, TSV or "
                        f"Parquet. {_limits_info()}")
            table = gr.Dataframe(value=_frame(list(zip(REFERENCE_INSTRUCTIONS, REFERENCE_RESPONSES))),
                                 headers=HEADERS, column_count=(2, "fixed"), row_count=(2, "dynamic"),
                                 datatype=["str", "str"], interactive=True, wrap=True, label="Pairs",
                                 elem_id="pairs-table", max_height=360, column_widths=["35%", "65%"])
            data_note = gr.Markdown(elem_id="data-note")  # the whole width: on a phone, buttons beside it squeezed it
            with gr.Row():
                table_only = gr.Button("Use the table only", elem_id="table-only", visible=False, size="sm", scale=0)
                undo = gr.Button("Undo upload", elem_id="undo-upload", visible=False, size="sm", scale=0)
            with gr.Row(equal_height=True):
                with gr.Column(scale=1):
                    example_btn = gr.Button("Load example data", elem_id="load-example")
                    example_api = gr.Button(visible=False)  # the /load_example endpoint: at once
                    instruction_col = gr.Textbox(label="Instruction column", placeholder="instruction (auto)")
                    response_col = gr.Textbox(label="Response column", placeholder="response / output (auto)")
                upload = gr.File(label=f"Upload pairs ({', '.join(UPLOAD_TYPES)})", file_types=list(UPLOAD_TYPES),
                                 elem_id="upload", height=190, scale=2)
                upload_api = gr.Button(visible=False)  # the /upload endpoint for API clients: errors raise there
            with gr.Row():
                with gr.Column(scale=3):
                    highlighted = gr.HighlightedText(label="What the model sees (highlighted tokens carry loss)",
                                                     color_map={"loss": "#fb923c"}, combine_adjacent=False,
                                                     show_legend=True, elem_id="preview")
                with gr.Column(scale=2):
                    preview_row = _widget("preview_row", value=1, label="Preview row")
                    counts = gr.Markdown(elem_id="counts")
                    problems = gr.Markdown(elem_id="problems")

        with gr.Column(variant="panel", elem_classes="jt-step", elem_id="train-step"):
            gr.Markdown("## ② Train")
            with gr.Row():
                model_name = gr.Dropdown(MODEL_CHOICES, value="auto", allow_custom_value=True, label="Model",
                                         info="auto: gpt2 if it can be had, else the embedded offline model (untrained)"
                                         + ("" if PUBLIC else "; or a local model directory"))
                loss_on = gr.Radio(list(LOSS_MODES), value="response", label="Loss on",
                                   info="response: answer + EOS · all: every token · reference: the original recipe")
                precision = gr.Radio(list(PRECISIONS), value="float32", label="Precision")
            with gr.Row(equal_height=True):
                method = gr.Radio(list(METHODS), value="Full fine-tuning", label="Method", elem_id="method", scale=3,
                                  info="LoRA: small adapters on a frozen base · QLoRA: LoRA on a base held in 4 bits "
                                  "(NF4)")
                lora_rank = _widget("lora_rank", value=LORA_RANK, label="LoRA rank", info="alpha = 2 x rank",
                                    visible=False, elem_id="lora-rank", scale=1)
            defaults_note = gr.Markdown(defaults.why, elem_id="defaults-note")
            with gr.Row():
                epochs = _widget("epochs", value=defaults.epochs, label="Epochs")
                batch_size = _widget("batch_size", value=defaults.batch_size, label="Batch size")
                learning_rate = _widget("learning_rate", value=defaults.learning_rate, label="Learning rate")
                max_length = _widget("max_length", value=defaults.max_length, label="Max length (tokens)")
            with gr.Row(equal_height=True):
                warmup = _widget("warmup_steps", value=defaults.warmup_steps, label="Warmup steps")
                seed = _widget("seed", value=0, label="Seed")
                val_fraction = _widget("validation_fraction", value=0.0, step=0.05, label="Validation fraction",
                                       elem_id="val-fraction", scale=2, min_width=240)
                pack = gr.Checkbox(value=False, label="Pack examples", elem_id="pack", min_width=240,
                                   info="several examples per row: little padding, fewer and larger steps")
                keep_best = gr.Checkbox(value=False, label="Keep the best", elem_id="keep-best", min_width=240,
                                        info=f"stop after {EARLY_STOPPING} validations without a new lowest; keep "
                                             "the lowest's weights")
            gr.Markdown(backend_info(), elem_id="backend")
            with gr.Row():
                train_btn = gr.Button("Start training", variant="primary", elem_id="train")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                command_btn = gr.Button("Show command", elem_id="command-btn")
            progress = gr.HTML(_progress_html(None), elem_id="progress")
            stop_note = gr.Markdown(elem_id="stop-note")
            with gr.Row():
                empty = _plot(None)
                plot = gr.LinePlot(empty["value"], x_lim=empty["x_lim"], y_lim=empty["y_lim"], x="step", y="loss",
                                   color="split", colors_in_legend=[],
                                   label=_plot_label(None),
                                   color_map={"train": "#f97316", "validation": "#2563eb"}, elem_id="loss-plot")
                log_box = gr.Textbox(label="Log (the whole run)", lines=12, max_lines=12, elem_id="log",
                                     autoscroll=True)
            command_line = gr.Textbox(label="The same run from the command line", visible=False, interactive=False,
                                      buttons=["copy"], elem_id="command-line")
            command = gr.Code(label="Its config.yaml", language="yaml", visible=False, elem_id="command",
                              interactive=False)

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown(f"## Runs\n{_runs_info()}")
            runs_table = gr.Dataframe(_runs_frame([]), headers=RUN_COLUMNS, interactive=False, elem_id="runs",
                                      max_height=300)
            with gr.Row(equal_height=True):
                run_pick = gr.Dropdown([], value=None, label="Run", elem_id="run-pick", scale=3)
                resume_btn = gr.Button("Resume", elem_id="resume", scale=1)
                delete_btn = gr.Button("Delete", variant="stop", elem_id="delete", scale=1)
                delete_api = gr.Button(visible=False)  # the API's /delete: at once
                resume_api = gr.Button(visible=False)  # the API's /resume: a refusal is an error
            run_note = gr.Markdown(elem_id="run-note")
            run_action = gr.Markdown(elem_id="run-action")  # what Resume or Delete just did, beside them

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown("## ③ Try\nThe base model and up to two of your runs (finished or stopped) answer side by side.")
            with gr.Row():
                try_a = gr.Dropdown([], value=None, label="Run A", elem_id="try-a")
                try_b = gr.Dropdown([], value=None, label="Run B (optional)", elem_id="try-b")
            with gr.Row():
                instruction = gr.Textbox(label="Instruction", value="Answer politely", scale=4, elem_id="instruction",
                                         max_length=MAX_INSTRUCTION_CHARS)
                try_btn = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
            with gr.Row():
                temperature = _widget("temperature", value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                      elem_id="temperature")
                top_p = _widget("top_p", value=0.95, step=0.05, label="Top-p")
                max_new = _widget("max_new_tokens", value=64, label="Max new tokens")
            with gr.Row():
                base_out = gr.Textbox(label="Base model", lines=4, elem_id="base-out")
                tuned_out = gr.Textbox(label="Run A", lines=4, elem_id="tuned-out")
                tuned_b_out = gr.Textbox(label="Run B", lines=4, elem_id="tuned-b-out")

        with gr.Column(variant="panel", elem_classes="jt-step", elem_id="eval-step"):
            gr.Markdown("## ④ Evaluate\nThe base model and your runs (finished or stopped) answer held-out pairs "
                        "(greedy), scored against the references: validation loss and perplexity, ROUGE-L (F1), exact "
                        "match, stop "
                        "rate (answers that ended by themselves) and mean length. " + _eval_limits_info())
            with gr.Row(equal_height=True):
                eval_source = gr.Radio([(label, key) for key, label in EVAL_SOURCES.items()], value="split",
                                       label="Held-out pairs", elem_id="eval-source", scale=3,
                                       info="the split: the pairs the first picked run held out (no run: step ②'s "
                                       f"fraction and seed) · bundled: "
                                       f"{HELD_OUT_DATA.name} · an upload is read like step ①'s")
                eval_upload = gr.File(label=f"Held-out pairs ({', '.join(UPLOAD_TYPES)})", elem_id="eval-upload",
                                      file_types=list(UPLOAD_TYPES), height=120, visible=False, scale=2)
            with gr.Row(equal_height=True):
                eval_base = gr.Checkbox(value=True, label="Base model", elem_id="eval-base", scale=1, min_width=160,
                                        info="the model the first run started from")
                eval_runs = gr.Dropdown([], value=[], multiselect=True, max_choices=MAX_EVAL_RUNS, elem_id="eval-runs",
                                        label=f"Runs (up to {MAX_EVAL_RUNS})", scale=3)
                eval_max_new = _widget("eval_max_new_tokens", value=min(64, BOUNDS["eval_max_new_tokens"].hi),
                                       label="Max new tokens", scale=2)
                eval_btn = gr.Button("Evaluate", variant="primary", elem_id="evaluate", scale=1)
            eval_progress = gr.HTML(_eval_progress_html(0, "pick held-out pairs and models, then press Evaluate"),
                                    elem_id="eval-progress")
            eval_summary = gr.Dataframe(pd.DataFrame(columns=SUMMARY_COLUMNS), interactive=False, label="Summary",
                                        elem_id="eval-summary")
            eval_examples = gr.Dataframe(pd.DataFrame(columns=["Instruction", "Reference"]), interactive=False,
                                         wrap=True, max_height=420, elem_id="eval-examples",
                                         label=f"Answers side by side (the first {TABLE_ROWS}; all in eval.jsonl)")
            eval_files = gr.File(label="Reports (eval.md, eval.json, eval.jsonl)", file_count="multiple",
                                 interactive=False, elem_id="eval-files")

        with gr.Column(variant="panel", elem_classes="jt-step"):
            gr.Markdown("## ⑤ Export\nThe picked run's Hugging Face directory as a zip (no checkpoints): it loads in "
                        "PyTorch `transformers` as it is. A LoRA or QLoRA run gives its adapter (PEFT's files: "
                        "`PeftModel.from_pretrained` on its base) or the merged full model.")
            with gr.Row(equal_height=True):
                export_kind = gr.Radio([(label, key) for key, label in EXPORT_KINDS.items()], value="adapter",
                                       label="Export a LoRA run as", visible=False, elem_id="export-kind", scale=2)
                export_btn = gr.DownloadButton("Download the picked run (.zip)", elem_id="export", interactive=False,
                                               scale=3)
            with gr.Row():
                repo = gr.Textbox(label="Hub repository", placeholder="you/my-helpdesk-gpt2")
                token = gr.Textbox(label="Hugging Face token", type="password")
                private = gr.Checkbox(value=True, label="Private")
                push_btn = gr.Button("Push to hub")
            push_status = gr.Markdown()

        with gr.Row(visible=False):  # API-only endpoints: gradio_client calls them, the page does not show them
            api_train = gr.Button(elem_id="api-train")
            api_runs = gr.Button(elem_id="api-runs")
            api_export = gr.Button(elem_id="api-export")
            api_generate = gr.Button(elem_id="api-generate")
            api_stop = gr.Button(elem_id="api-stop")
            api_text = gr.Textbox()
            api_json = gr.JSON()
            api_file = gr.File()

        # preprocess=False: the functions get the values as sent, and check them themselves (see BOUNDS)
        raw = dict(preprocess=False)
        view = [progress, plot, log_box, runs_table, run_pick, try_a, try_b, eval_runs, export_btn, export_kind,
                run_note, command_line, command, stop_note]
        quiet = dict(show_progress="hidden", api_visibility="private")
        preview_inputs = [table, preview_row, max_length, loss_on, session]
        preview_outputs = [highlighted, counts, problems]
        private_preview = dict(fn=preview, inputs=preview_inputs, outputs=preview_outputs, api_visibility="private",
                               **raw)
        demo.load(preview, preview_inputs, preview_outputs, api_name="preview", **raw)  # first: it owns the name
        demo.load(attach, [saved, session], [session, *view], **quiet, **raw)
        settings = [loss_on, precision, method, lora_rank, epochs, batch_size, learning_rate, max_length, warmup,
                    seed, val_fraction, pack, keep_best, temperature, top_p, max_new,  # in SETTINGS' order
                    eval_source, eval_base, eval_max_new]
        demo.load(restore_page, [page_state, settings_state], [table, model_name, data_note, applied, *settings], **quiet,
                  **raw).then(**private_preview)
        for widget in settings:
            widget.change(remember_settings, settings, settings_state, trigger_mode="always_last", **quiet, **raw)
        remember = dict(fn=remember_page, inputs=[table, model_name, session], outputs=page_state,
                        trigger_mode="always_last", **quiet, **raw)
        for trigger in (table.change, model_name.change):
            trigger(**remember)
        poll_inputs = [session, saved, try_a, try_b, eval_runs]
        # every poll takes the values raw: a run picked for Try that has begun training since is no longer a choice,
        # and Gradio's own check of it popped an 'Error' listing run ids
        timer.tick(poll, poll_inputs, [session, *view], trigger_mode="once", **quiet, **raw)
        # after a load, what the page keeps is written again even when the table looks the same (the example's first
        # rows over themselves: no change event), or a reload would not say that the pairs beyond it stayed behind
        example_btn.click(load_example_in_page, [table, session], [table, session, data_note, table_only],
                          api_visibility="private", **raw).then(_undo_button, session, undo, api_visibility="private") \
            .then(**private_preview).then(**remember)
        example_api.click(load_example, session, [table, session], api_name="load_example", **raw)
        upload_inputs = [upload, instruction_col, response_col, table, session]
        rest_and_undo = dict(fn=lambda s: (_rest_button(s), _undo_button(s)), inputs=session,
                             outputs=[table_only, undo], api_visibility="private")
        upload.upload(upload_in_page, upload_inputs, [table, data_note, session, upload], **quiet, **raw) \
            .then(**rest_and_undo).then(**private_preview).then(**remember)
        undo.click(undo_upload, [table, session], [table, data_note, session], **quiet, **raw).then(**rest_and_undo) \
            .then(**private_preview).then(**remember)
        upload_api.click(upload_file, upload_inputs, [table, data_note, session], api_name="upload", **raw)
        table_only.click(use_table_only, session, [data_note, session], api_name="use_table_only") \
            .then(_rest_button, session, table_only, api_visibility="private").then(**private_preview) \
            .then(**remember)
        for trigger in (table.input, preview_row.change, max_length.change, loss_on.change):
            trigger(show_progress="hidden", **private_preview)
        # raw: a number out of a field's range is said by Start, in the app's words, not as Gradio's bare "Value
        # 99999999 is greater than maximum value 180000." as it is typed
        model_name.change(follow_model, [model_name, epochs, batch_size, learning_rate, max_length, warmup, applied],
                          [epochs, batch_size, learning_rate, max_length, warmup, defaults_note, applied], **quiet,
                          **raw)
        for field in (epochs, batch_size, learning_rate, max_length, warmup):
            field.input(typed_defaults_note, [model_name, epochs, batch_size, learning_rate, max_length, warmup,
                                              applied], defaults_note, trigger_mode="always_last", **quiet, **raw)
        method.input(method_note, [method, model_name], None, **quiet)
        method.change(lambda m: gr.update(visible=m != "Full fine-tuning"), method, lora_rank, **quiet)
        train_inputs = [table, model_name, loss_on, epochs, batch_size, learning_rate, max_length, warmup, seed,
                        precision, val_fraction, pack, method, lora_rank, keep_best, session]
        train_btn.click(start_run, [*train_inputs, saved], [saved, session, *view], show_progress="minimal",
                        api_name="start", concurrency_limit=None, **raw) \
            .success(lambda: ("", ""), None, [stop_note, run_action], **quiet)  # notes about the run before
        api_train.click(train_run, train_inputs, [progress, plot, log_box, session], api_name="train",
                        concurrency_limit=None, **raw)
        stop_btn.click(stop_run, session, stop_note, api_name="stop", concurrency_limit=None) \
            .then(poll, poll_inputs, [session, *view], **quiet, **raw)
        command_btn.click(show_command, session, [command_line, command], api_name="command")
        run_pick.input(pick_run, [run_pick, session], [session, *view], **quiet, **raw) \
            .then(lambda: "", None, run_action, **quiet)  # what Resume or Delete said was about the run before
        runs_table.select(pick_row, session, [session, *view], **quiet).then(lambda: "", None, run_action, **quiet)
        resume_btn.click(resume_in_page, [run_pick, session], run_action, **quiet, **raw) \
            .then(remember_watched, [session, saved], saved, **quiet, **raw) \
            .then(lambda: "", None, stop_note, **quiet) \
            .then(poll, poll_inputs, [session, *view], **quiet, **raw)
        resume_api.click(resume_run, [run_pick, session], run_action, api_name="resume", **raw)
        delete_btn.click(delete_in_page, [run_pick, session], run_action, **quiet, **raw) \
            .then(poll, poll_inputs, [session, *view], **quiet, **raw)
        delete_api.click(delete_run, [run_pick, session], run_action, api_name="delete", **raw)
        api_runs.click(runs_json, session, api_json, api_name="runs")
        api_stop.click(stop_by_id, [api_text, session], api_text, api_name="stop_run", concurrency_limit=None, **raw)
        api_export.click(export_zip, [run_pick, export_kind, session], [api_file, session], api_name="export", **raw)
        export_kind.input(pick_export, [export_kind, session], [session, export_btn], queue=False, **quiet, **raw) \
            .then(show_export, session, [session, *view], **quiet)
        try_inputs = [instruction, temperature, top_p, max_new, model_name, try_a, try_b, session]
        try_outputs = [base_out, tuned_out, tuned_b_out]
        api_generate.click(try_models, try_inputs, try_outputs, api_name="generate", concurrency_limit=2,
                           concurrency_id="try", **raw)
        for trigger in (try_btn.click, instruction.submit):  # two answer at once at the most, the API's included
            trigger(try_in_page, try_inputs, try_outputs, api_visibility="private", concurrency_limit=2,
                    concurrency_id="try", **raw)
        eval_source.change(lambda s: gr.update(visible=s == "upload"), eval_source, eval_upload, **quiet)
        eval_btn.click(evaluate, [eval_source, eval_upload, instruction_col, response_col, table, val_fraction, seed,
                                  max_length, loss_on, eval_base, eval_runs, eval_max_new, model_name, session],
                       [eval_progress, eval_summary, eval_examples, session], api_name="evaluate",
                       concurrency_limit=1 + EVAL_WAITING, concurrency_id="evaluate", show_progress="hidden",
                       **raw) \
            .success(eval_reports, session, eval_files, api_name="eval_reports", show_progress="hidden")
        push_btn.click(push_to_hub, [repo, token, private, run_pick, export_kind, session], [push_status, session],
                       api_name="push", **raw)
        demo.unload(_unload)
    return demo


demo = build_app()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        css=CSS, head=HEAD, theme=gr.themes.Soft(primary_hue="orange"), show_error=False,  # gr.Error messages only
        max_file_size=MAX_UPLOAD_BYTES)
