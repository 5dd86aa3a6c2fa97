"""LoRA: low-rank adapters on GPT-2's projections, trained while the base weights stay frozen, saved and loaded in
PyTorch PEFT's format (adapter_config.json + adapter_model.safetensors), and merged into a plain model.

An adapted projection computes x @ W + b + (alpha / r) * (x @ A) @ B with A [in, r] and B [r, out]; B starts at
zero, so training starts from the base model exactly. GPT-2's projections are Conv1D layers in PyTorch (weights
[in, out], PEFT's `fan_in_fan_out`); PEFT stores lora_A.weight as [r, in] and lora_B.weight as [out, r], the
transposes of A and B.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.rundir import readable_by_all

# --lora-targets names: PEFT matches a module whose dotted name ends with the target, so "c_proj" adapts both the
# attention's and the MLP's output projections, "mlp.c_proj" only the MLP's.
TARGETS = ("c_attn", "c_proj", "c_fc", "attn.c_proj", "mlp.c_proj")
_MODULES = {"c_attn": ("attn", "c_attn"), "attn.c_proj": ("attn", "c_proj"), "c_fc": ("mlp", "c_fc"),
            "mlp.c_proj": ("mlp", "c_proj")}
PEFT_PREFIX = "base_model.model.transformer."


class LoRAParam(nnx.Variable):
    """An adapter weight: trained, while nnx.Param (the base model) is frozen. Not an nnx.Param, so the Hugging
    Face export of the base (`to_hf_state_dict`) never sees it."""


class LoRA(nnx.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, *, dropout: float = 0.0, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(d_in)  # PEFT's init of lora_A: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(in), ...)
        self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (d_in, rank), jnp.float32, -bound, bound))
        self.lora_b = LoRAParam(jnp.zeros((rank, d_out), jnp.float32))
        self.scale, self.dropout = float(alpha) / rank, float(dropout)

    def __call__(self, x_BTK, rng=None):
        """(alpha / r) * (dropout(x) @ A) @ B; dropout (PEFT's lora_dropout) only with a key, i.e. in training."""
        from jaxtune.model import _dropout, matmul

        x_BTK = _dropout(x_BTK, self.dropout, rng)
        return matmul(matmul(x_BTK, self.lora_a[...]), self.lora_b[...]) * jnp.asarray(self.scale, x_BTK.dtype)


def _modules(targets) -> list[tuple[str, str]]:
    """('attn'|'mlp', attribute) pairs for the target names."""
    out = []
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"lora_targets: unknown {t!r}; choose from {', '.join(TARGETS)}")
        out += [_MODULES["attn.c_proj"], _MODULES["mlp.c_proj"]] if t == "c_proj" else [_MODULES[t]]
    return list(dict.fromkeys(out))


def add_lora(model, rank: int, alpha: float | None = None, targets=("c_attn", "c_proj"), *, dropout: float = 0.0, seed: int = 0):
    """Attach adapters to the target projections of every block (in place); returns the model."""
    alpha = float(alpha if alpha is not None else 2 * rank)
    rngs = nnx.Rngs(seed)
    for block in model.h:
        for parent, name in _modules(targets):
            layer = getattr(getattr(block, parent), name)
            d_in, d_out = layer.quant[1] if getattr(layer, "quant", None) else layer.kernel.get_value().shape
            layer.lora = LoRA(d_in, d_out, rank, alpha, dropout=dropout, rngs=rngs)
    model.lora_info = (rank, alpha, tuple(targets), float(dropout))  # static: (r, alpha, target names, dropout)
    return model


def has_lora(model) -> bool:
    return bool(getattr(model, "lora_info", None))


def adapter_differences(model, rank: int, alpha: float | None, targets, dropout: float) -> list[str]:
    """How the adapters a model carries differ from these settings ("lora_rank: 2 -> 4"); the same targets in
    another order, or c_proj against attn.c_proj and mlp.c_proj, are the same."""
    asked = (rank, float(alpha if alpha is not None else 2 * rank), tuple(targets), float(dropout))
    names = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")
    same = lambda a, b: a == b or (isinstance(a, tuple) and set(_modules(a)) == set(_modules(b)))  # noqa: E731
    return [f"{n}: {a!r} -> {b!r}" for n, a, b in zip(names, model.lora_info, asked) if not same(a, b)]


def _adapted(model):
    """(PEFT module name, LoRA module) for every adapted projection."""
    for i, block in enumerate(model.h):
        for parent in ("attn", "mlp"):
            for name in ("c_attn", "c_proj", "c_fc"):
                layer = getattr(getattr(block, parent), name, None)
                if layer is not None and getattr(layer, "lora", None) is not None:
                    yield f"h.{i}.{parent}.{name}", layer


def adapter_state_dict(model) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors keys and arrays."""
    out = {}
    for name, layer in _adapted(model):
        a = np.asarray(jax.device_get(layer.lora.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(layer.lora.lora_b[...]), np.float32)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out


def adapter_config(model, base_model: str) -> dict:
    rank, alpha, targets, dropout = model.lora_info
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
            "fan_in_fan_out": True, "bias": "none", "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None, "use_rslora": False, "use_dora": False, "revision": None}


def save_adapter(model, directory: Path, *, base_model: str) -> list[str]:
    """Write adapter_config.json and adapter_model.safetensors into `directory`; returns the file names."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config(model, base_model), indent=2) + "\n")
    save_file(adapter_state_dict(model), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    readable_by_all(directory / "adapter_model.safetensors")
    return ["adapter_config.json", "adapter_model.safetensors"]


def is_adapter_dir(path) -> bool:
    """A LoRA adapter folder in PEFT's format: adapter_config.json and no config.json (a folder with both holds a full
    model, which is what loads from it)."""
    path = Path(path)
    return (path / "adapter_config.json").exists() and not (path / "config.json").exists()


def merged_beside(folder) -> Path | None:
    """A LoRA run's merged/ (RunConfig.merge) when it was written from the adapter now in `folder`, else None (no
    merged model, or one older than the adapter: a resume trained the adapter on)."""
    merged, adapter = Path(folder) / "merged" / "model.safetensors", Path(folder) / "adapter_model.safetensors"
    if merged.exists() and adapter.exists() and merged.stat().st_mtime_ns >= adapter.stat().st_mtime_ns:
        return merged.parent
    return None


def load_adapter(directory, *, base: str | None = None, load_base=None, dtype=jnp.float32):
    """(model with adapters, tokenizer) from a PEFT LoRA folder (jaxtune's or one PEFT wrote in PyTorch): the base
    comes from `base` or the config's base_model_name_or_path (a folder relative to the adapter's is tried too)."""
    from jaxtune.checkpoint import ModelLoadError, load

    directory = Path(directory)
    try:
        cfg = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{directory}/adapter_config.json cannot be read ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{directory}: a {cfg.get('peft_type')} adapter; jaxtune reads LoRA adapters only")
    # PEFT options that change what the adapters compute or where they sit: jaxtune's LoRA has one rank and one alpha
    # on whole projections of every block, so an adapter that uses them is refused rather than read differently
    for key in ("use_dora", "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "layers_pattern", "exclude_modules", "layer_replication", "trainable_token_indices", "lora_bias"):
        if cfg.get(key) not in (None, [], {}, False, ""):
            raise ModelLoadError(f"{directory}: {key}={cfg[key]!r} is not supported by jaxtune's LoRA (one rank and "
                                 "alpha, on whole projections of every block); train the adapter without it")
    if cfg.get("bias", "none") not in ("none", None):
        raise ModelLoadError(f"{directory}: bias={cfg['bias']!r} is not supported by jaxtune's LoRA (it trains no "
                             "biases: bias='none'); train the adapter without it")
    given = base
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{directory}: adapter_config.json names no base model; pass one (--base)")
    named = base
    if not given and not os.path.isabs(base) and (directory / base).is_dir():
        base = str(directory / base)
    if Path(base).expanduser().resolve() == directory.expanduser().resolve():
        raise ModelLoadError(f"{directory}: the adapter names its own folder as its base model ({named!r}); pass the "
                             "base it was trained on with --base DIR (base= to jaxtune.load)")
    try:
        model, tokenizer = (load_base or load)(base)
    except ModelLoadError as e:
        if given:  # the caller's own choice: nothing to say about the adapter's
            raise ModelLoadError(f"{e}. It was given as the base of the adapter in {directory} (--base; base= to "
                                 "jaxtune.load): give a model folder or hub name there") from None
        raise ModelLoadError(f"{e}. It is the base the adapter in {directory} names ({named!r}); if it is elsewhere "
                             "now, pass it with --base DIR (to generate or eval; base= to jaxtune.load)") from None
    targets = cfg.get("target_modules") or ["c_attn"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    add_lora(model, int(cfg["r"]), float(cfg.get("lora_alpha", 8)), targets, dropout=float(cfg.get("lora_dropout") or 0))
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}
    for name, layer in _adapted(model):
        key = f"{PEFT_PREFIX}{name}"
        a, b = tensors.pop(f"{key}.lora_A.weight", None), tensors.pop(f"{key}.lora_B.weight", None)
        if a is None or b is None:
            raise ModelLoadError(f"{directory}: no adapter weights for {name} (lora_A/lora_B)")
        layer.lora.lora_a[...] = jnp.asarray(a.T, dtype)
        layer.lora.lora_b[...] = jnp.asarray(b.T, dtype)
    if tensors:
        raise ModelLoadError(f"{directory}: unexpected adapter tensors {', '.join(sorted(tensors)[:3])}")
    model.source = f"{directory} (LoRA r={cfg['r']} on {base})"
    model.origin = str(Path(base).resolve()) if Path(base).is_dir() else base  # what a save names again
    return model, tokenizer


def without_adapters(model):
    """The base model alone: a copy with the adapters taken off, not merged."""
    base = nnx.clone(model)
    for _, layer in _adapted(base):
        del layer.lora
    if hasattr(base, "lora_info"):
        del base.lora_info
    return base


def merge(model):
    """A plain model (no adapters) whose projections hold W + (alpha / r) * A @ B: what PEFT's merge_and_unload gives.
    A quantized (QLoRA) base is dequantized first, as PEFT does when it merges into a 4-bit base."""
    from jaxtune.model import GPT2LMHeadModel
    from jaxtune.quantize import dequantized

    merged = dequantized(model)
    for _, layer in _adapted(merged):
        lora = layer.lora
        layer.kernel[...] = layer.kernel[...] + lora.scale * (lora.lora_a[...] @ lora.lora_b[...])
        del layer.lora
    if hasattr(merged, "lora_info"):
        del merged.lora_info
    assert isinstance(merged, GPT2LMHeadModel)
    return merged
