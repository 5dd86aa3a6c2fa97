"""Generation: prompt `Instruction: {i}\\nResponse:`, answered in batches over one key/value cache, greedy or sampled.

Prompts are padded on the left, so every row's last prompt token sits in the same cache slot and all rows decode in
step. Position ids count real tokens only and a per-slot mask hides the pads, as Hugging Face does with left padding
and an attention_mask, so a row's answer does not depend on its neighbours. Prompt lengths and batch sizes come from
small sets of buckets: a handful of compiled programs. Each row stops at its EOS (or its limit); once at most half the
rows are still answering they move to a smaller batch, and the batch ends when every row has stopped.

Sampling: temperature, then top-k, then top-p, exactly as transformers' TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper. Each answer's random stream is seeded by (seed, its index in the list), so an answer does not depend
on the batch it lands in.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.config import checked_float, checked_int
from jaxtune.data import bucket_length, format_prompt, tokenize_text
from jaxtune.model import check_model_and_tokenizer, init_cache

_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_BATCH_SIZE = 64  # rows answered together; batches of fewer prompts are padded to a power of two
_CACHE_BYTES = 1 << 30  # a batch's key/value cache stays under this (fewer rows for long prompts and big models)
_DECODE_CHUNK = 16  # decoding steps between looks at which rows have finished


# ---------------------------------------------------------------------------------------------- the next token
def filtered_logits(logits_BV, temperature, top_k, top_p, *, use_top_k: bool = True, use_top_p: bool = True):
    """Logits (less each row's largest) divided by temperature, then every token outside the top-k (0 = off) and
    then outside the top-p nucleus (1.0 = off) set to -inf: transformers' Temperature-, TopK- and TopPLogitsWarper,
    in generate's order. use_top_k / use_top_p (static) skip the sort when the caller knows a filter is off."""
    # each row's largest logit taken off first changes no probability, and a tiny temperature then gives 0 for the
    # largest and -inf for the rest (greedy, its limit) instead of inf - inf = NaN and a token drawn from noise
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = (logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)) / temperature
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


def _argmax(x_BV):
    """jnp.argmax over the last axis (top_k also returns the first index of the largest value). XLA's CPU argmax,
    or a max and then a min, fused behind the head's matmul took 4-5x the matmul's time over 50,257 tokens;
    top_k is its own kernel and leaves the matmul alone."""
    return jax.lax.top_k(x_BV, 1)[1][:, 0].astype(jnp.int32)


def _next_tokens(logits_BV, keys_B, step, values, sampling):
    """One token per row: argmax when greedy, else a draw from the filtered distribution with the row's key
    folded with the step. values: (temperature, top_k, top_p) on the device; sampling: the static flags."""
    (temperature, top_k, top_p), (greedy, use_top_k, use_top_p) = values, sampling
    if greedy:
        return _argmax(logits_BV)
    logits_BV = filtered_logits(logits_BV, temperature, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p)
    # jax.random.categorical's draw (Gumbel noise per row, then the argmax), with the faster argmax
    gumbel_BV = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, step), logits_BV.shape[-1:]))(keys_B)
    return _argmax(logits_BV + gumbel_BV)


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


def _row_keys(seed, rows_B):
    """Each answer's key: the seed folded with the answer's index in the caller's list."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows_B)


class _Structure:
    """A model's graph definition as the compiled programs' static argument, hashed once. jit hashes its static
    arguments on every call, and hashing a GPT-2 GraphDef took 0.5 ms: a streamed answer paid it for every token."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Structure) and (self.graphdef is other.graphdef or (
            self._hash == other._hash and self.graphdef == other.graphdef))


def _split(model):
    graphdef, params = nnx.split(model)
    return _Structure(graphdef), params


@partial(jax.jit, static_argnames=("graphdef", "sampling", "max_new_tokens"))
def _start(graphdef, params, prompt_BP, pad_B, limit_B, rows_B, seed, eos_id, values, *, sampling, max_new_tokens):
    """Prefill and pick each row's first token. Returns the batch's state: per-row arrays (the cache's are
    [L, B, ...]) that `_decode_steps` carries on and `_take_rows` can shrink."""
    model = nnx.merge(graphdef.graphdef, params)
    B, P = prompt_BP.shape
    keys_B = _row_keys(seed, rows_B)
    logits_BV, cache, mask_BS = _prefill(model, prompt_BP, pad_B, P + max_new_tokens, _cache_dtype(params))
    return {"token": _next_tokens(logits_BV, keys_B, 0, values, sampling), "cache": cache, "mask": mask_BS,
            "out": jnp.full((B, max_new_tokens), eos_id, jnp.int32), "done": limit_B <= 0,
            "count": jnp.zeros((B,), jnp.int32), "pad": pad_B, "limit": limit_B, "keys": keys_B}


@partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("rows",))
def _decode_steps(graphdef, params, rows, i, steps, P, eos_id, values, *, sampling):
    """From step i, up to `steps` steps of a while loop that ends early once every row has written EOS or reached
    its limit. Step i writes each row's pending token (out[:, i]) and computes the next. Returns (next i, rows)."""
    model = nnx.merge(graphdef.graphdef, params)
    end = jnp.minimum(i + steps, rows["out"].shape[1])

    def cond(carry):
        i, r = carry
        return (i < end) & ~jnp.all(r["done"])

    def body(carry):
        i, r = carry
        token_B = r["token"]
        out_BN = r["out"].at[:, i].set(token_B)
        count_B = r["count"] + (~r["done"]).astype(jnp.int32)  # a finished row's answer is out[b, :count[b]]
        done_B = r["done"] | (token_B == eos_id) | (i + 1 >= r["limit"])
        logits_BV, cache = _decode(model, token_B, i, P, r["pad"], r["mask"], r["cache"])
        token_B = _next_tokens(logits_BV, r["keys"], i + 1, values, sampling)
        return i + 1, {**r, "token": token_B, "cache": cache, "out": out_BN, "done": done_B, "count": count_B}

    return jax.lax.while_loop(cond, body, (i, rows))


@jax.jit
def _take_rows(rows, take_B):
    """The batch state of rows `take_B` only (a smaller batch once most rows have finished)."""
    return {k: ({n: a[:, take_B] for n, a in v.items()} if k == "cache" else v[take_B]) for k, v in rows.items()}


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
    # within float32's normal numbers: XLA flushes a subnormal temperature to 0 (0 / 0), and the largest float32 is
    # as uniform as infinity
    temperature = min(max(temperature, float(np.finfo(np.float32).tiny)), float(np.finfo(np.float32).max))
    values = (jnp.float32(temperature if not greedy else 1.0), jnp.int32(top_k), jnp.float32(top_p))
    return values, (greedy, top_k > 0, top_p < 1.0), seed  # the flags pick a program; the values are its inputs


def _tokenize(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    check_model_and_tokenizer(model, tokenizer, "generate(model, tokenizer, ...)")
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


def _cache_rows(model, prompt_len: int, max_new_tokens: int, batch_size: int, itemsize: int = 4) -> int:
    """batch_size, lowered (to a power of two) until the batch's key/value cache fits in _CACHE_BYTES."""
    c = model.config
    row = 2 * c.n_layer * (prompt_len + max_new_tokens) * c.n_embd * itemsize
    while batch_size > 1 and batch_size * row > _CACHE_BYTES:
        batch_size = 1 << (batch_size - 1).bit_length() - 1
    return batch_size


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
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 on_progress: Callable[[int, int], None] | None = None) -> list[int] | list[list[int]]:
    """New token ids after each prompt (raw text, special tokens' strings read as text), each ending with EOS when
    the model stopped by itself. One prompt gives one list; a list of prompts gives a list of lists, answered
    `batch_size` at a time (prompts of similar length together). on_progress(answered, total) follows each batch."""
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
        graphdef, params = _split(model)
        eos = tokenizer.eos_token_id
        longest = bucket_length(max(len(r) for r in ids), _PROMPT_BUCKETS, limit)
        batch_size = _cache_rows(model, longest, steps, batch_size, _cache_dtype(params).itemsize)
        order = sorted(range(len(ids)), key=lambda k: -len(ids[k]))  # similar lengths share a batch: little padding
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            B = _batch_rows(len(chunk), batch_size)
            prompt, pad = _left_padded([ids[k] for k in chunk], B, eos, limit)
            limits = np.zeros((B,), np.int32)
            limits[: len(chunk)] = [row_limits[k] for k in chunk]
            rows = np.zeros((B,), np.uint32)
            rows[: len(chunk)] = chunk
            state = _start(graphdef, params, jnp.asarray(prompt), jnp.asarray(pad), jnp.asarray(limits),
                           jnp.asarray(rows), jnp.uint32(seed), jnp.int32(eos), values, sampling=sampling,
                           max_new_tokens=steps)
            for k, answer in _decode_all(graphdef, params, state, chunk + [-1] * (B - len(chunk)), prompt.shape[1],
                                         eos, values, sampling):
                answers[k] = answer
            if on_progress is not None:
                on_progress(start + len(chunk), len(ids))
    return answers[0] if single else answers


def _answers(state, index):
    """(caller's index, new token ids) of every real row in the batch state."""
    out, count = np.asarray(state["out"]), np.asarray(state["count"])
    return [(k, [int(t) for t in out[b, : count[b]]]) for b, k in enumerate(index) if k >= 0]


def _decode_all(graphdef, params, state, index: list[int], P: int, eos: int, values, sampling):
    """Decode a started batch to the end, _DECODE_CHUNK steps at a time. Once at most half its rows are still
    answering, those move to a batch half the size (or smaller), so finished rows stop costing compute.
    Yields (caller's index, new token ids); index is -1 for padding rows."""
    i, steps = 0, state["out"].shape[1]
    while True:
        i, state = _decode_steps(graphdef, params, state, jnp.int32(i), jnp.int32(_DECODE_CHUNK), jnp.int32(P),
                                 jnp.int32(eos), values, sampling=sampling)
        i, done = int(i), np.asarray(state["done"])
        if done.all() or i >= steps:
            break
        live, B = np.flatnonzero(~done), len(done)
        smaller = _batch_rows(len(live), B)
        if smaller <= B // 2:
            finished = [index[b] if done[b] else -1 for b in range(B)]
            yield from _answers(state, finished)
            take = np.concatenate([live, np.flatnonzero(done)[: smaller - len(live)]])  # filled up with finished rows
            state = _take_rows(state, jnp.asarray(take, jnp.int32))
            index = [-1 if done[b] else index[b] for b in take]
    yield from _answers(state, index)


def response_text(tokenizer, ids: list[int]) -> str:
    """An answer's text from its new token ids (its EOS left out)."""
    ids = [t for t in ids if t != tokenizer.eos_token_id]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _checked_instructions(instructions) -> list[str]:
    many = not isinstance(instructions, str)
    if many and not isinstance(instructions, (list, tuple)):
        raise ValueError(f"instructions: give one text (a str) or a list of them, not {type(instructions).__name__} "
                         f"({instructions!r:.60})")
    items = list(instructions) if many else [instructions]
    for k, text in enumerate(items):
        which = f"instruction {k + 1} of {len(items)}" if many else "the instruction"
        if not isinstance(text, str):
            raise ValueError(f"{which} is not text: {text!r:.60} ({type(text).__name__})")
        if not text.strip():
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
    texts = [response_text(tokenizer, a) for a in ids]
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
    graphdef, params = _split(model)
    prompt, pad = _left_padded([ids], 1, tokenizer.eos_token_id, limit)
    eos = jnp.int32(tokenizer.eos_token_id)
    state = _start(graphdef, params, jnp.asarray(prompt), jnp.asarray(pad), jnp.asarray([max_new_tokens], jnp.int32),
                   jnp.zeros((1,), jnp.uint32), jnp.uint32(seed), eos, values, sampling=sampling,
                   max_new_tokens=max_new_tokens)
    answer: list[int] = []
    for i in range(max_new_tokens):
        t = int(np.asarray(state["token"])[0])  # the token step i writes (waits for it; no indexing op to dispatch)
        if t == tokenizer.eos_token_id:
            break
        answer.append(t)
        if i + 1 < max_new_tokens:  # the next token's step runs while this one is decoded to text and shown
            _, state = _decode_steps(graphdef, params, state, jnp.int32(i), jnp.int32(1), jnp.int32(prompt.shape[1]),
                                     eos, values, sampling=sampling)
        yield response_text(tokenizer, answer)
