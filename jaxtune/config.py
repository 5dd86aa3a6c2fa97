"""Configuration: the GPT-2 architecture (read from a Hugging Face config.json) and the training options."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

# Activations that GPT-2 checkpoints on the hub use, by their Hugging Face names.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu", "gelu_fast", "quick_gelu", "relu", "silu", "swish", "tanh")

# config.json keys that change the computation and that this model does not implement, with the value it needs.
_UNSUPPORTED = {
    "add_cross_attention": False,
    "scale_attn_weights": True,
    "is_encoder_decoder": False,
}

# Model names offered by the app and the command line; any other hub id or local directory works too.
HUB_MODELS = ("gpt2", "distilgpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class ConfigError(ValueError):
    """A model configuration that jaxtune cannot run faithfully."""


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2's architecture, with Hugging Face's field names."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    def __post_init__(self):
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"activation_function={self.activation_function!r} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> "GPT2Config":
        """Build from a Hugging Face GPT-2 config dict, refusing options that would silently change the model."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(f"{source}: model_type={model_type!r}; jaxtune runs GPT-2 models (model_type 'gpt2') only")
        for key, needed in _UNSUPPORTED.items():
            if key in hf and hf[key] != needed:
                raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported by jaxtune's GPT-2 (needs {needed!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in hf.items() if k in names})

    def to_hf(self) -> dict[str, Any]:
        """The config.json that transformers.GPT2LMHeadModel reads."""
        out = dataclasses.asdict(self)
        out.update(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            n_ctx=self.n_positions,
            scale_attn_weights=True,
            reorder_and_upcast_attn=False,
            use_cache=True,
        )
        return out


# The embedded offline model: GPT-2's architecture and vocabulary, small, randomly initialised (untrained).
PRESETS: dict[str, GPT2Config] = {
    "tiny": GPT2Config(n_positions=256, n_embd=128, n_layer=2, n_head=4),
    "gpt2": GPT2Config(),
    "distilgpt2": GPT2Config(n_layer=6),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
}

QUANTIZE = ("none", "int8", "nf4")
LOSS_MODES = ("response", "all", "reference")


# Integer training options: (least, most). The upper bounds keep a typo from planning or allocating without
# bound (an epoch count is planned lazily, but 10**9 epochs of anything is a mistake); seeds are numpy's range.
_TRAIN_INTS = {"epochs": (1, 100_000), "batch_size": (1, 65_536), "max_length": (1, 2**20), "grad_accum": (1, 4096),
               "warmup_steps": (0, 2**31 - 1), "seed": (0, 2**32 - 1)}


def checked_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high], or a ValueError that says which option, what it got and what it takes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name}={value!r} must be a whole number")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low:,} and {high:,}" if high is not None else f"at least {low:,}"
        raise ValueError(f"{name}={value:,} is out of range: it must be {bound}")
    return value


def checked_float(name: str, value, *, positive: bool = False) -> float:
    """`value` as a finite float (> 0 if `positive`, else >= 0), or a ValueError that says so. A numeric string is
    taken: YAML 1.1 reads `5e-3` (no dot) as text."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name}={value!r} must be a number, like 0.005 or 5e-3") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}={value} must be a finite number {'above' if positive else 'of at least'} 0")
    return value


@dataclass
class TrainConfig:
    """Everything a training run needs besides the data and the model."""

    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 5e-5
    max_length: int = 256
    loss_on: str = "response"  # response | all | reference
    seed: int = 0
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    grad_accum: int = 1
    dropout: bool = True
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (master weights stay float32)
    max_steps: int | None = None  # stop after this many optimizer steps (None: run all epochs)
    fsdp: bool = False  # shard parameters and optimizer state over the devices (else replicate them)
    pack: bool = False  # several examples per row of max_length tokens (batch_size then counts rows)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on lora_targets, the base frozen (see jaxtune.lora)
    lora_alpha: float | None = None  # the adapters' scale is alpha / rank; default 2 * rank
    # the attention's qkv and both output projections: on the help-desk data as good as all four projections, and
    # twice c_attn's gain alone (PEFT's GPT-2 default); measured by benchmarks/lora_quality.py (see the README)
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj")  # also c_fc, attn.c_proj, mlp.c_proj
    lora_dropout: float = 0.0  # dropout on the adapters' input (PEFT's lora_dropout), with dropout on
    quantize: str = "none"  # QLoRA: hold the frozen base's projections in int8 or nf4 (needs lora_rank > 0)
    remat: bool = False  # gradient checkpointing per block: recompute each block's inside in the backward pass
    buckets: tuple[int, ...] = field(default=(32, 64, 128, 256, 512, 1024))

    def __post_init__(self):
        if self.loss_on not in LOSS_MODES:
            raise ValueError(f"loss_on={self.loss_on!r}: choose one of {', '.join(LOSS_MODES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: choose float32 or bfloat16")
        for name, (low, high) in _TRAIN_INTS.items():
            setattr(self, name, checked_int(name, getattr(self, name), low, high))
        if self.max_steps is not None:
            self.max_steps = checked_int("max_steps", self.max_steps, 1, 2**31 - 1)
        # a NaN or infinite rate would train into NaN weights; `not x > 0` is also true for NaN
        self.learning_rate = checked_float("learning_rate", self.learning_rate, positive=True)
        self.weight_decay = checked_float("weight_decay", self.weight_decay)
        self.grad_clip = checked_float("grad_clip", self.grad_clip, positive=True)
        for name in ("dropout", "fsdp", "pack", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if isinstance(self.buckets, (str, bytes)) or not self.buckets:
            raise ValueError(f"buckets={self.buckets!r} must be a list of lengths, e.g. [32, 64, 128, 256]")
        self.buckets = tuple(sorted(checked_int("buckets", b, 1, 2**20) for b in self.buckets))
        self.lora_rank = checked_int("lora_rank", self.lora_rank, 0, 4096)
        if self.lora_alpha is not None:
            self.lora_alpha = checked_float("lora_alpha", self.lora_alpha, positive=True)
        targets = [self.lora_targets] if isinstance(self.lora_targets, str) else list(self.lora_targets or [])
        known = ("c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj")
        if not targets or any(t not in known for t in targets):
            raise ValueError(f"lora_targets={targets!r}: choose one or more of {', '.join(known)}")
        self.lora_targets = tuple(targets)
        self.lora_dropout = checked_float("lora_dropout", self.lora_dropout)
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be below 1")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize={self.quantize!r}: choose one of {', '.join(QUANTIZE)}")
        if self.quantize != "none" and not self.lora_rank:
            raise ValueError(f"quantize={self.quantize!r} holds the frozen base of a LoRA run in fewer bits: "
                             "set lora_rank too (e.g. --lora-rank 16), or quantize 'none' for full fine-tuning")
        if self.pack and self.loss_on == "reference":
            raise ValueError("pack=True cannot be combined with loss_on='reference', which trains on padding; "
                             "use loss_on 'response' or 'all'")


@dataclass
class RunConfig:
    """A whole command-line run: what to train, on what, where to write it, and how (`train`).

    Loadable from YAML (`--config run.yaml`); command-line flags override it; the effective config is written
    into the run directory as `config.yaml`, so `--config runs/x/config.yaml` repeats the run exactly.
    """

    model: str = "auto"
    data: str | None = None
    split: str = "train"  # for Hugging Face data sets
    output: str | None = None
    validation_data: str | None = None
    validation_fraction: float = 0.0  # held out from `data` (seeded) when no validation_data is given
    instruction_column: str | None = None
    response_column: str | None = None
    eval_every: int | None = None  # validation loss every N steps (and always at the end)
    early_stopping: int | None = None  # stop after N evaluations without a lower validation loss; keep the best weights
    samples: int = 4  # held-out instructions answered at the end into samples.jsonl
    strict: bool = False  # duplicates and truncated rows become errors
    save_every: int | None = None  # checkpoint (orbax) every N steps into <output>/checkpoints; also on stop
    keep_checkpoints: int = 3
    allow_pickle: bool = False
    distributed: str = "auto"  # several hosts: auto (when the environment says so), on, off; see jaxtune.sharding
    report_to: list = field(default_factory=lambda: ["none"])  # none, tensorboard, trackio, wandb (see jaxtune.tracking)
    merge: bool = False  # a LoRA run also writes the merged full model into <output>/merged
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if self.distributed not in ("auto", "on", "off"):
            raise ValueError(f"distributed={self.distributed!r}: choose auto, on or off")
        for name in ("model", "data", "split", "output", "validation_data", "instruction_column", "response_column"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}={value!r} must be one path or name (text), not a {type(value).__name__}")
        self.validation_fraction = checked_float("validation_fraction", self.validation_fraction)
        if not self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in [0, 1)")
        if self.validation_data and self.validation_fraction:  # options that would be ignored are refused
            raise ValueError("validation_data (--validation-data) and validation_fraction (--validation-fraction) both "
                             "pick the held-out pairs: give one of them")
        if not self.train.lora_rank and (self.merge or self.train.lora_alpha is not None):
            raise ValueError(f"{'merge' if self.merge else 'lora_alpha'} applies to LoRA runs: set lora_rank "
                             "(--lora-rank), or leave it out")
        for name in ("eval_every", "save_every", "early_stopping"):
            if getattr(self, name) is not None:
                setattr(self, name, checked_int(name, getattr(self, name), 1))
        if self.early_stopping and not (self.validation_data or self.validation_fraction):
            raise ValueError("early_stopping watches the validation loss: give held-out pairs (validation_data or "
                             "validation_fraction; --validation-data or --validation-fraction)")
        self.keep_checkpoints = checked_int("keep_checkpoints", self.keep_checkpoints, 1, 1000)
        self.report_to = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or ["none"])
        unknown = [r for r in self.report_to if r not in ("none", "tensorboard", "trackio", "wandb")]
        if unknown:
            raise ValueError(f"report_to={unknown}: choose from none, tensorboard, trackio, wandb")
        self.samples = checked_int("samples", self.samples, 0, 10_000)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["train"]["buckets"] = list(self.train.buckets)
        out["train"]["lora_targets"] = list(self.train.lora_targets)
        return out

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "config") -> "RunConfig":
        if not isinstance(values, dict) or not isinstance(values.get("train") or {}, dict):
            raise ValueError(f"{source}: expected a mapping of options, with 'train' a mapping of training options")
        known = {f.name for f in dataclasses.fields(cls)}
        train_known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = [k for k in values if k not in known]
        unknown += [f"train.{k}" for k in (values.get("train") or {}) if k not in train_known]
        if unknown:
            hints = []
            for key in unknown:
                name = key.removeprefix("train.")
                if not key.startswith("train.") and name in train_known:
                    hints.append(f"{key} goes under train:")
                elif key.startswith("train.") and name in known:
                    hints.append(f"{key} goes at the top level, not under train:")
                else:
                    close = difflib.get_close_matches(name, train_known if key.startswith("train.") else
                                                      known | train_known, n=1)
                    if close:
                        where = "train." if close[0] in train_known and close[0] not in known else ""
                        hints.append(f"{key}: did you mean {where}{close[0]}?")
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}"
                             + (f" ({'; '.join(hints)})" if hints else "")
                             + f"; known: {', '.join(sorted(known))} and train.{{{', '.join(sorted(train_known))}}}")
        values = dict(values)
        values["train"] = TrainConfig(**(values.get("train") or {}))
        return cls(**values)
