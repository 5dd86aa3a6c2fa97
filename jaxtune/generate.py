"""Generation: prompt `Instruction: {i}\\nResponse:`, answered in batches over one key/value cache, greedy or sampled.

Prompts are padded on the left, so every row's last prompt token sits in the same cache slot and all rows decode in
step. Position ids count real tokens only and a per-slot mask hides the pads, as Hugging Face does with left padding
and an attention_mask, so a row's answer does not depend on its neighbours. Prompt lengths and batch sizes come from
small sets of buckets: a handful of compiled programs. Each row stops at its EOS (or its limit); the batch stops when
every row has.

Sampling: temperature, then top-k, then top-p, exactly as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper. Each answer's random stream is seeded by (seed, its index in the list), so an answer does not depend
on the batch it lands in.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.config import checked_float, checked_int
from jaxtune.data import bucket_length, format_prompt, tokenize_text
from jaxtune.model import init_cache

_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_BATCH_SIZE = 32  # rows answered together; batches of fewer prompts are padded to a power of two


# ---------------------------------------------------------------------------------------------- the next token
def filtered_logits(logits_BV, temperature, top_k, top_p, *, use_top_k: bool = True, use_top_p: bool = True):
    """Logits divided by temperature, then every token outside the top-k (0 = off) and then outside the top-p
    nucleus (1.0 = off) set to -inf: transformers' Temperature-, TopK- and TopPLogitsWarper, in generate's order.
    use_top_k / use_top_p (static) skip the sort when the caller knows a filter is off."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if not (use_top_k or use_top_p):
        return logits_BV
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    keep_BV = jnp.ones(sorted_BV.shape, bool)
    if use_top_k:  # TopK removes what is below the k-th largest value (ties with it stay)
        kth_B = sorted_BV[:, jnp.clip(top_k - 1, 0, V - 1)]
        keep_BV = (top_k <= 0) | (sorted_BV >= kth_B[:, None])
        sorted_BV = jnp.where(keep_BV, sorted_BV, -jnp.inf)
    if use_top_p:  # TopP sums probabilities from the smallest up and removes tokens whose sum is <= 1 - top_p
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        from_smallest_BV = jnp.cumsum(probs_BV[:, ::-1], axis=-1)[:, ::-1]
        keep_BV &= (top_p >= 1.0) | (from_smallest_BV > 1.0 - top_p)
        keep_BV = keep_BV.at[:, 0].set(True)  # the most likely token always stays
    threshold_B = sorted_BV[jnp.arange(sorted_BV.shape[0]), jnp.sum(keep_BV, axis=-1) - 1]  # kept: a prefix
    return jnp.where(logits_BV >= threshold_B[:, None], logits_BV, -jnp.inf)


def _next_tokens(logits_BV, keys_B, step, values, sampling):
    """One token per row: argmax when greedy, else a draw from the filtered distribution with the row's key
    folded with the step. values: (temperature, top_k, top_p) on the device; sampling: the static flags."""
    (temperature, top_k, top_p), (greedy, use_top_k, use_top_p) = values, sampling
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filtered_logits(logits_BV, temperature, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_B)
    return jax.vmap(jax.random.categorical)(step_keys, logits_BV).astype(jnp.int32)


def sample_logits(logits_V, key, temperature, top_k, top_p):
    """One token from one row of logits: temperature, then top-k (0 = off), then top-p (1.0 = off)."""
    logits_1V = filtered_logits(logits_V[None], temperature, top_k, top_p)
    return jax.random.categorical(key, logits_1V[0]).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- the model calls
def _prefill(model, prompt_BP, pad_B, cache_len: int, cache_dtype):
    """Run the left-padded prompts into a new cache: (last position's logits [B, V], cache, per-slot mask [B, S])."""
    B, P = prompt_BP.shape
    mask_BS = jnp.arange(cache_len)[None, :] >= pad_B[:, None]  # pads are never attended
    positions_BP = jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0)
    cache = init_cache(model.config, B, cache_len, cache_dtype)
    logits_B1V, cache = model(prompt_BP, attention_mask_BS=mask_BS, positions_BT=positions_BP, cache=cache,
                              cache_index=0, logit_positions_BK=jnp.full((B, 1), P - 1, jnp.int32))
    return logits_B1V[:, 0], cache, mask_BS


def _decode(model, token_B, step, P, pad_B, mask_BS, cache):
    """Feed each row's step-th new token (cache slot P + step, position = the row's real tokens so far)."""
    positions_B1 = jnp.minimum(P - pad_B + step, model.config.n_positions - 1)[:, None]  # finished rows may run past
    logits_B1V, cache = model(token_B[:, None], attention_mask_BS=mask_BS, positions_BT=positions_B1, cache=cache,
                              cache_index=P + step)
    return logits_B1V[:, 0], cache


def _cache_dtype(params):
    return jax.tree.leaves(params)[0].dtype


@partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new_tokens"))
def _generate_batch(graphdef, params, prompt_BP, pad_B, limit_B, keys_B, eos_id, values, *, sampling, max_new_tokens):
    """Prefill, then a while loop that runs until every row has written EOS or reached its limit.
    Returns (tokens [B, max_new_tokens], count [B]): row b's answer is tokens[b, :count[b]]."""
    model = nnx.merge(graphdef, params)
    B, P = prompt_BP.shape
    logits_BV, cache, mask_BS = _prefill(model, prompt_BP, pad_B, P + max_new_tokens, _cache_dtype(params))
    first_B = _next_tokens(logits_BV, keys_B, 0, values, sampling)
    out_BN = jnp.full((B, max_new_tokens), eos_id, jnp.int32)

    def cond(state):
        i, _, _, _, done_B, _ = state
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        i, token_B, cache, out_BN, done_B, count_B = state
        out_BN = out_BN.at[:, i].set(token_B)
        count_B = count_B + (~done_B).astype(jnp.int32)
        done_B = done_B | (token_B == eos_id) | (i + 1 >= limit_B)
        logits_BV, cache = _decode(model, token_B, i, P, pad_B, mask_BS, cache)  # the last one's token goes unused
        return i + 1, _next_tokens(logits_BV, keys_B, i + 1, values, sampling), cache, out_BN, done_B, count_B

    state = (jnp.int32(0), first_B, cache, out_BN, limit_B <= 0, jnp.zeros((B,), jnp.int32))
    _, _, _, out_BN, _, count_B = jax.lax.while_loop(cond, body, state)
    return out_BN, count_B


@partial(jax.jit, static_argnames=("graphdef", "sampling", "cache_len"))
def _stream_prefill(graphdef, params, prompt_BP, pad_B, keys_B, values, *, sampling, cache_len):
    model = nnx.merge(graphdef, params)
    logits_BV, cache, mask_BS = _prefill(model, prompt_BP, pad_B, cache_len, _cache_dtype(params))
    return _next_tokens(logits_BV, keys_B, 0, values, sampling), cache, mask_BS


@partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _stream_step(graphdef, params, token_B, step, P, pad_B, mask_BS, cache, keys_B, values, *, sampling):
    model = nnx.merge(graphdef, params)
    logits_BV, cache = _decode(model, token_B, step, P, pad_B, mask_BS, cache)
    return _next_tokens(logits_BV, keys_B, step + 1, values, sampling), cache


# ---------------------------------------------------------------------------------------------- batching
def _sampling(temperature, top_k, top_p, seed):
    """Checked sampling settings: (device values, static flags for the compiled programs, seed). A bad value is a
    ValueError that names it and its range."""
    temperature = 0.0 if temperature is None else checked_float("temperature", temperature)
    top_k = checked_int("top_k", top_k or 0, 0, 2**31 - 1)
    top_p = 1.0 if top_p is None else checked_float("top_p", top_p, positive=True)
    if top_p > 1.0:
        raise ValueError(f"top_p={top_p} must be above 0 and at most 1 (1 keeps every token)")
    seed = checked_int("seed", seed, 0, 2**32 - 1)
    greedy = temperature <= 0
    values = (jnp.float32(temperature if not greedy else 1.0), jnp.int32(top_k), jnp.float32(top_p))
    return values, (greedy, top_k > 0, top_p < 1.0), seed  # the flags pick a program; the values are its inputs


def _row_keys(seed: int, rows) -> jax.Array:
    """Each answer's key: the seed folded with the answer's index in the caller's list."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.uint32))


def _tokenize(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    limit = model.config.n_positions
    out = []
    for k, tokens in enumerate(tokenize_text(tokenizer, prompts)):  # `<|endoftext|>` typed in a prompt is text
        which = "the prompt" if len(prompts) == 1 else f"prompt {k + 1} of {len(prompts)}"
        if not tokens.ids:
            raise ValueError(f"{which} is empty")
        if len(tokens.ids) >= limit:
            raise ValueError(f"{which} is {len(tokens.ids)} tokens; this model reads at most {limit}. "
                             f"Shorten the instruction")
        out.append(list(tokens.ids))
    return out


def _batch_rows(n: int, batch_size: int) -> int:
    """Rows of the compiled batch for n prompts: the next power of two, at most batch_size."""
    return min(1 << max(n - 1, 0).bit_length(), batch_size)


def _left_padded(rows: list[list[int]], batch: int, pad_id: int, limit: int):
    """[batch, P] prompt ids padded on the left to a bucket length, and each row's pad count. Rows past the real
    ones hold a single pad token (the caller gives them a limit of 0)."""
    P = bucket_length(max(len(r) for r in rows), _PROMPT_BUCKETS, limit)
    prompt = np.full((batch, P), pad_id, np.int32)
    pad = np.full((batch,), P - 1, np.int32)
    for b, ids in enumerate(rows):
        prompt[b, P - len(ids):] = ids
        pad[b] = P - len(ids)
    return prompt, pad


def generate_ids(model, tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> list[int] | list[list[int]]:
    """New token ids after each prompt (raw text, special tokens' strings read as text), each ending with EOS when
    the model stopped by itself. One prompt gives one list; a list of prompts gives a list of lists, answered
    `batch_size` at a time (prompts of similar length together)."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    max_new_tokens = checked_int("max_new_tokens", max_new_tokens, 0, 2**20)
    batch_size = checked_int("batch_size", batch_size, 1, 4096)
    values, sampling, seed = _sampling(temperature, top_k, top_p, seed)
    ids = _tokenize(model, tokenizer, prompts)
    limit = model.config.n_positions
    row_limits = [min(max_new_tokens, limit - len(r)) for r in ids]  # no position past the model's last
    steps = max(row_limits, default=0)
    answers: list[list[int]] = [[] for _ in ids]
    if steps > 0:
        graphdef, params = nnx.split(model)
        eos = tokenizer.eos_token_id
        order = sorted(range(len(ids)), key=lambda k: -len(ids[k]))  # similar lengths share a batch: little padding
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            B = _batch_rows(len(chunk), batch_size)
            prompt, pad = _left_padded([ids[k] for k in chunk], B, eos, limit)
            limits = np.zeros((B,), np.int32)
            limits[: len(chunk)] = [row_limits[k] for k in chunk]
            rows = np.zeros((B,), np.uint32)
            rows[: len(chunk)] = chunk
            out, count = _generate_batch(graphdef, params, jnp.asarray(prompt), jnp.asarray(pad), jnp.asarray(limits),
                                         _row_keys(seed, rows), eos, values, sampling=sampling,
                                         max_new_tokens=steps)
            out, count = np.asarray(out), np.asarray(count)
            for b, k in enumerate(chunk):
                answers[k] = [int(t) for t in out[b, : count[b]]]
    return answers[0] if single else answers


def _response_text(tokenizer, ids: list[int]) -> str:
    ids = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _checked_instructions(instructions) -> list[str]:
    many = not isinstance(instructions, str)
    items = list(instructions) if many else [instructions]
    for k, text in enumerate(items):
        if not isinstance(text, str) or not text.strip():
            which = f"instruction {k + 1} of {len(items)}" if many else "the instruction"
            raise ValueError(f"{which} is empty; type what the model should do")
    return items


def generate(model, tokenizer, instructions: str | Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = DEFAULT_BATCH_SIZE) -> str | list[str]:
    """The model's response to one instruction (a str), or to each of a list (a list of str, answered in batches).
    Greedy by default; temperature > 0 samples (top_k, top_p), seeded by `seed` and each instruction's index."""
    items = _checked_instructions(instructions)
    ids = generate_ids(model, tokenizer, [format_prompt(i) for i in items], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size)
    texts = [_response_text(tokenizer, a) for a in ids]
    return texts[0] if isinstance(instructions, str) else texts


def stream(model, tokenizer, instruction: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
    """Like `generate` for one instruction, yielding the response text so far after each new token (for the app)."""
    if not isinstance(instruction, str):
        raise ValueError("stream answers one instruction; use generate for a list")
    _checked_instructions(instruction)
    max_new_tokens = checked_int("max_new_tokens", max_new_tokens, 0, 2**20)
    values, sampling, seed = _sampling(temperature, top_k, top_p, seed)
    limit = model.config.n_positions
    ids = _tokenize(model, tokenizer, [format_prompt(instruction)])[0]
    max_new_tokens = min(max_new_tokens, limit - len(ids))
    if max_new_tokens <= 0:
        return
    graphdef, params = nnx.split(model)
    prompt, pad = _left_padded([ids], 1, tokenizer.eos_token_id, limit)
    P, pad, keys = prompt.shape[1], jnp.asarray(pad), _row_keys(seed, [0])
    token, cache, mask = _stream_prefill(graphdef, params, jnp.asarray(prompt), pad, keys, values,
                                         sampling=sampling, cache_len=P + max_new_tokens)
    answer: list[int] = []
    for i in range(max_new_tokens):
        t = int(token[0])
        if t == tokenizer.eos_token_id:
            break
        answer.append(t)
        yield _response_text(tokenizer, answer)
        if i + 1 == max_new_tokens:
            break
        token, cache = _stream_step(graphdef, params, token, i, P, pad, mask, cache, keys, values,
                                     sampling=sampling)
