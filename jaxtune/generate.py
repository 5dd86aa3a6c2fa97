"""Generation: prompt `Instruction: {i}\\nResponse:`, a jitted decode loop over a key/value cache, greedy or sampled.

The prompt is right-padded to a bucket length so that different prompts reuse one compiled program; decoding
writes each new token at the next cache position, so padding in the cache is overwritten before it is attended.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.config import checked_float, checked_int
from jaxtune.data import bucket_length, format_prompt, tokenize_text
from jaxtune.model import init_cache

_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)


def sample_logits(logits_V, key, temperature, top_k, top_p):
    """One token from logits: temperature, then top-k (0 = off), then top-p (1.0 = off) on what is left."""
    logits_V = logits_V.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_V = jnp.sort(logits_V)[::-1]
    rank = jnp.arange(sorted_V.shape[0])
    sorted_V = jnp.where((top_k <= 0) | (rank < top_k), sorted_V, -jnp.inf)
    probs = jax.nn.softmax(sorted_V)
    keep = (jnp.cumsum(probs) - probs) < top_p  # the smallest prefix whose mass reaches top_p
    threshold = sorted_V[jnp.maximum(jnp.sum(keep & jnp.isfinite(sorted_V)) - 1, 0)]
    return jax.random.categorical(key, jnp.where(logits_V >= threshold, logits_V, -jnp.inf)).astype(jnp.int32)


def _next_token(logits_V, key, temperature, top_k, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits_V).astype(jnp.int32)
    return sample_logits(logits_V, key, temperature, top_k, top_p)


@partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _prefill(graphdef, params, prompt_1P, prompt_len, cache, key, temperature, top_k, top_p, greedy):
    model = nnx.merge(graphdef, params)
    logits_1PV, cache = model(prompt_1P, cache=cache, cache_index=0)
    return _next_token(logits_1PV[0, prompt_len - 1], key, temperature, top_k, top_p, greedy), cache


@partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _decode_one(graphdef, params, token, index, cache, key, temperature, top_k, top_p, greedy):
    model = nnx.merge(graphdef, params)
    logits_11V, cache = model(token.reshape(1, 1), cache=cache, cache_index=index)
    return _next_token(logits_11V[0, 0], key, temperature, top_k, top_p, greedy), cache


@partial(jax.jit, static_argnames=("graphdef", "greedy", "max_new_tokens"))
def _generate_loop(graphdef, params, prompt_1P, prompt_len, cache, key, temperature, top_k, top_p, eos_id,
                   greedy, max_new_tokens):
    """Prefill, then a lax.while_loop that stops at EOS or max_new_tokens; returns (tokens, count)."""
    model = nnx.merge(graphdef, params)
    key, k0 = jax.random.split(key)
    logits_1PV, cache = model(prompt_1P, cache=cache, cache_index=0)
    first = _next_token(logits_1PV[0, prompt_len - 1], k0, temperature, top_k, top_p, greedy)
    out = jnp.full((max_new_tokens,), eos_id, jnp.int32)

    def cond(state):  # stop once EOS has been written, or at max_new_tokens
        i, _, _, out, _ = state
        return (i < max_new_tokens) & ((i == 0) | (out[jnp.maximum(i - 1, 0)] != eos_id))

    def body(state):
        i, token, cache, out, key = state
        out = out.at[i].set(token)
        key, k = jax.random.split(key)  # the last call's token is never used; it keeps the loop's shape simple
        logits_11V, cache = model(token.reshape(1, 1), cache=cache, cache_index=prompt_len + i)
        return i + 1, _next_token(logits_11V[0, 0], k, temperature, top_k, top_p, greedy), cache, out, key

    i, last, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), first, cache, out, key))
    return out, i


def _prepare(model, tokenizer, prompt: str, max_new_tokens: int):
    max_new_tokens = checked_int("max_new_tokens", max_new_tokens, 0, 2**20)
    ids = tokenize_text(tokenizer, [prompt])[0].ids  # `<|endoftext|>` typed in a prompt is text, not EOS
    limit = model.config.n_positions
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) >= limit:
        raise ValueError(f"the prompt is {len(ids)} tokens; this model reads at most {limit}. Shorten the instruction")
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    padded_len = bucket_length(len(ids), _PROMPT_BUCKETS, limit)
    cache_len = bucket_length(len(ids) + max_new_tokens, _PROMPT_BUCKETS, limit)
    prompt = np.full((1, padded_len), tokenizer.eos_token_id, np.int32)
    prompt[0, : len(ids)] = ids
    graphdef, params = nnx.split(model)
    cache_dtype = jax.tree.leaves(params)[0].dtype
    return graphdef, params, jnp.asarray(prompt), len(ids), init_cache(model.config, 1, cache_len, cache_dtype), max_new_tokens


def _sampling(temperature, top_k, top_p, seed):
    """Checked sampling settings as device scalars: a bad value is a ValueError that names it and its range."""
    temperature = 0.0 if temperature is None else checked_float("temperature", temperature)
    top_k = checked_int("top_k", top_k or 0, 0, 2**31 - 1)
    top_p = 1.0 if top_p is None else checked_float("top_p", top_p, positive=True)
    if top_p > 1.0:
        raise ValueError(f"top_p={top_p} must be above 0 and at most 1 (1 keeps every token)")
    seed = checked_int("seed", seed, 0, 2**32 - 1)
    greedy = temperature <= 0
    return (jnp.float32(temperature or 1.0), jnp.int32(top_k or 0), jnp.float32(top_p if top_p is not None else 1.0),
            jax.random.key(seed), greedy)


def generate_ids(model, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """New token ids after `prompt` (raw text, special tokens' strings read as text), ending with EOS when the model
    stopped by itself."""
    temp, k, p, key, greedy = _sampling(temperature, top_k, top_p, seed)
    graphdef, params, prompt_1P, n, cache, max_new_tokens = _prepare(model, tokenizer, prompt, max_new_tokens)
    if max_new_tokens <= 0:
        return []
    out, count = _generate_loop(graphdef, params, prompt_1P, n, cache, key, temp, k, p, tokenizer.eos_token_id,
                                greedy=greedy, max_new_tokens=max_new_tokens)
    return [int(t) for t in np.asarray(out)[: int(count)]]


def _response_text(tokenizer, ids: list[int]) -> str:
    ids = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate(model, tokenizer, instruction: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    """The model's response to an instruction (greedy by default; temperature > 0 samples)."""
    if not instruction or not instruction.strip():
        raise ValueError("the instruction is empty; type what the model should do")
    ids = generate_ids(model, tokenizer, format_prompt(instruction), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return _response_text(tokenizer, ids)


def stream(model, tokenizer, instruction: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
    """Like `generate`, yielding the response text so far after each new token (for the app)."""
    if not instruction or not instruction.strip():
        raise ValueError("the instruction is empty; type what the model should do")
    temp, k, p, key, greedy = _sampling(temperature, top_k, top_p, seed)
    graphdef, params, prompt_1P, n, cache, max_new_tokens = _prepare(model, tokenizer, format_prompt(instruction), max_new_tokens)
    key, sub = jax.random.split(key)
    token, cache = _prefill(graphdef, params, prompt_1P, n, cache, sub, temp, k, p, greedy=greedy)
    ids: list[int] = []
    for i in range(max_new_tokens):
        t = int(token)
        if t == tokenizer.eos_token_id:
            break
        ids.append(t)
        yield _response_text(tokenizer, ids)
        if i + 1 == max_new_tokens:
            break
        key, sub = jax.random.split(key)
        token, cache = _decode_one(graphdef, params, token, n + i, cache, sub, temp, k, p, greedy=greedy)
