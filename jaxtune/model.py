"""GPT-2 in flax.nnx, with Hugging Face's attribute names so checkpoints map one to one.

Shapes use nanodo's suffixes: B batch, T query length, S key length, D model width, N heads, H head width,
V vocabulary, L layers. Dropout takes an explicit key (`dropout_rng`); without one the model is deterministic,
which keeps the jitted train step a pure function of (params, batch, key).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.config import GPT2Config

_ACT = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def _dropout(x, rate: float, rng):
    """Inverted dropout: each element kept with probability 1 - rate (to 1/65536) and scaled by 1 / that."""
    if rng is None or rate == 0.0:
        return x
    keep, kept = keep_mask(rng, rate, x.shape)
    return jnp.where(keep, x / kept, 0).astype(x.dtype)


def keep_mask(rng, rate: float, shape) -> tuple[jax.Array, float]:
    """(mask, keep probability): each element True with probability 1 - rate, rounded to a multiple of 1/65536.
    Two elements share one 32-bit random word (16 bits each): the masks took a sixth of a CPU training step with
    one threefry word per element (jax.random.bernoulli), and this halves that. Leading axes keep their shape, so
    a row-split batch gets row-split masks."""
    threshold = min(max(round((1.0 - rate) * 65536), 1), 65535)
    *lead, last = shape
    words = jax.random.bits(rng, (*lead, (last + 1) // 2), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, -1)[..., :last]
    return halves < jnp.uint16(threshold), threshold / 65536


def _rows_split(x):
    """Under a device mesh with a "fsdp" axis (the train step sets it while tracing), keep activations split by
    rows over every device. Without this XLA may split them by width next to fsdp-split weights, and then
    computes dropout masks for the whole batch on every device (8x the memory on 8 devices)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "fsdp" not in mesh.axis_names:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp")))


def _split(rng, n):
    return [None] * n if rng is None else list(jax.random.split(rng, n))


def _normal(std):
    return nnx.initializers.normal(stddev=std)


class GPT2Attention(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        d, std = config.n_embd, 0.02
        self.c_attn = nnx.Linear(d, 3 * d, kernel_init=_normal(std), rngs=rngs)
        self.c_proj = nnx.Linear(d, d, kernel_init=_normal(std / math.sqrt(2 * config.n_layer)), rngs=rngs)
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.attn_pdrop, self.resid_pdrop = config.attn_pdrop, config.resid_pdrop

    def __call__(self, x_BTD, mask_B1TS, kv_cache=None, cache_index=None, dropout_rng=None):
        B, T, D = x_BTD.shape
        qkv_BTD = linear(self.c_attn, x_BTD, _adapter_rng(dropout_rng, 0))
        q_BTNH, k_BTNH, v_BTNH = jnp.split(qkv_BTD.reshape(B, T, 3, self.n_head, self.head_dim), 3, axis=2)
        q_BTNH, k_BTNH, v_BTNH = q_BTNH[:, :, 0], k_BTNH[:, :, 0], v_BTNH[:, :, 0]
        if kv_cache is not None:  # write this chunk at cache_index of this layer's slot, attend over the layer's cache
            k_LBSNH, v_LBSNH, layer = kv_cache  # every layer's cache, updated in place (no per-layer copy to restack)
            at = (layer, 0, cache_index, 0, 0)
            k_LBSNH = jax.lax.dynamic_update_slice(k_LBSNH, k_BTNH[None].astype(k_LBSNH.dtype), at)
            v_LBSNH = jax.lax.dynamic_update_slice(v_LBSNH, v_BTNH[None].astype(v_LBSNH.dtype), at)
            k_BTNH, v_BTNH = k_LBSNH[layer], v_LBSNH[layer]
            kv_cache = (k_LBSNH, v_LBSNH)
        attn_rng, resid_rng = _split(dropout_rng, 2)
        if attn_rng is not None and self.attn_pdrop > 0:  # attention-probability dropout needs the explicit form
            w_BNTS = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BTNH).astype(jnp.float32) * self.scale
            if mask_B1TS is None:
                mask_B1TS = jnp.tril(jnp.ones((T, T), bool))[None, None]
            w_BNTS = jax.nn.softmax(jnp.where(mask_B1TS, w_BNTS, jnp.finfo(jnp.float32).min), axis=-1)
            w_BNTS = _dropout(w_BNTS.astype(v_BTNH.dtype), self.attn_pdrop, attn_rng)
            y_BTNH = jnp.einsum("bnts,bsnh->btnh", w_BNTS, v_BTNH)
        else:
            y_BTNH = attention(q_BTNH, k_BTNH, v_BTNH, mask_B1TS, self.scale, fused=kv_cache is None)
        y_BTD = linear(self.c_proj, y_BTNH.reshape(B, T, D), _adapter_rng(dropout_rng, 1))
        return _dropout(y_BTD, self.resid_pdrop, resid_rng), kv_cache


def matmul(x_BTK, w_KN, bias_N=None):
    """x @ w (+ bias). In bfloat16 on a CPU, every product of the forward and backward pass (x @ w, g @ w.T,
    x.T @ g) is accumulated and returned in float32, the bias added, and the result rounded: XLA's CPU kernels for
    AVX-512-BF16 run that form at about twice the float32 rate, a bfloat16-output product at about the float32
    rate, and the bias gradient is then a float32 sum. Elsewhere: the plain product."""
    if x_BTK.dtype == w_KN.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
        y = _matmul_f32_accumulate(x_BTK, w_KN)
        return (y if bias_N is None else y + bias_N).astype(jnp.bfloat16)
    y = x_BTK @ w_KN
    return y if bias_N is None else y + bias_N


@jax.custom_vjp
def _matmul_f32_accumulate(x_BTK, w_KN):
    return jnp.einsum("...k,kn->...n", x_BTK, w_KN, preferred_element_type=jnp.float32)


def _matmul_f32_accumulate_fwd(x_BTK, w_KN):
    return _matmul_f32_accumulate(x_BTK, w_KN), (x_BTK, w_KN)


def _matmul_f32_accumulate_bwd(residuals, g_BTN):
    x_BTK, w_KN = residuals
    g_BTN = g_BTN.astype(x_BTK.dtype)
    dx_BTK = jnp.einsum("...n,kn->...k", g_BTN, w_KN, preferred_element_type=jnp.float32)
    dw_KN = jnp.einsum("...k,...n->kn", x_BTK, g_BTN, preferred_element_type=jnp.float32)
    return dx_BTK.astype(x_BTK.dtype), dw_KN.astype(w_KN.dtype)


_matmul_f32_accumulate.defvjp(_matmul_f32_accumulate_fwd, _matmul_f32_accumulate_bwd)


def linear(layer: nnx.Linear, x_BTK, adapter_rng=None):
    """layer(x) through `matmul`: the same parameters and result as nnx.Linear's own call, plus the layer's LoRA
    adapter where it has one (see `jaxtune.lora`; `adapter_rng` is its dropout key)."""
    if getattr(layer, "quant", None):  # QLoRA's frozen base, held in int8 or nf4 (see jaxtune.quantize)
        from jaxtune.quantize import quantized_linear

        y = quantized_linear(layer, x_BTK)
    else:
        y = matmul(x_BTK, layer.kernel[...], None if layer.bias is None else layer.bias[...])
    adapter = getattr(layer, "lora", None)
    return y if adapter is None else y + adapter(x_BTK, adapter_rng)


def _adapter_rng(rng, i: int):
    """A LoRA dropout key derived from a layer's key, leaving the model's own dropout keys as they were."""
    return None if rng is None else jax.random.fold_in(rng, 1_000_003 + i)


def checkpointed(block, x_BTD, extras):
    """block(x_BTD, *extras) keeping only its input for the backward pass, which recomputes the block's inside.

    jax.checkpoint does this with optimization barriers, which XLA's CPU compiler drops before merging the
    recomputation back into the forward pass, so on CPUs it saved nothing (a memory plan equal to the plain
    step's). Here the backward pass recomputes from the input tied to the incoming gradient (`tied`), which no
    compiler can hoist into the forward pass."""
    graphdef, state = nnx.split(block)
    return _recomputed(graphdef, state, x_BTD, extras)


def tied(x, g):
    """x (floats or integers), made to depend on g: plus g's first element times zero, which XLA does not fold
    for floats."""
    return x + (g.reshape(-1)[0] * 0).astype(x.dtype)


def _block_output(graphdef, state, x_BTD, extras):
    mask_B1TS, rng = extras
    return nnx.merge(graphdef, state)(x_BTD, mask_B1TS, None, None, rng)[0]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recomputed(graphdef, state, x_BTD, extras):
    return _block_output(graphdef, state, x_BTD, extras)


def _recomputed_fwd(graphdef, state, x_BTD, extras):
    return _block_output(graphdef, state, x_BTD, extras), (state, x_BTD, extras)


def _recomputed_bwd(graphdef, residuals, g_BTD):
    state, x_BTD, (mask_B1TS, rng) = residuals
    if rng is not None:  # the dropout masks too: drawn from the same key, XLA would merge them with the forward's
        rng = jax.random.wrap_key_data(tied(jax.random.key_data(rng), g_BTD), impl=jax.random.key_impl(rng))
    _, vjp = jax.vjp(partial(_block_output, graphdef), state, tied(x_BTD, g_BTD), (mask_B1TS, rng))
    return vjp(g_BTD)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def attention_implementation(dtype) -> str | None:
    """cuDNN's fused (flash) attention on an NVIDIA GPU in bfloat16/float16; XLA's everywhere else (CPU, TPU,
    float32). jax.nn.dot_product_attention picks XLA's unless asked, so the GPU path asks."""
    return "cudnn" if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else None


def attention(q_BTNH, k_BTNH, v_BTNH, mask_B1TS, scale: float, *, fused: bool = True, implementation="auto"):
    """Softmax attention, causal when there is no mask. fused: may use the platform's fused kernel (training and
    scoring; decoding over a cache always uses XLA's). A fused kernel that this GPU or cuDNN version cannot run
    for these shapes (jax says so while tracing) falls back to XLA's."""
    impl = attention_implementation(q_BTNH.dtype) if implementation == "auto" else implementation
    kwargs = {"is_causal": True} if mask_B1TS is None else {"mask": mask_B1TS}
    if fused and impl is not None:
        try:
            return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, scale=scale, implementation=impl, **kwargs)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, scale=scale, **kwargs)


class GPT2MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        d, inner, std = config.n_embd, config.inner_dim, 0.02
        self.c_fc = nnx.Linear(d, inner, kernel_init=_normal(std), rngs=rngs)
        self.c_proj = nnx.Linear(inner, d, kernel_init=_normal(std / math.sqrt(2 * config.n_layer)), rngs=rngs)
        self.act = _ACT[config.activation_function]
        self.resid_pdrop = config.resid_pdrop

    def __call__(self, x_BTD, dropout_rng=None):
        h_BTF = self.act(linear(self.c_fc, x_BTD, _adapter_rng(dropout_rng, 2)))
        return _dropout(linear(self.c_proj, h_BTF, _adapter_rng(dropout_rng, 3)), self.resid_pdrop, dropout_rng)


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, *, rngs: nnx.Rngs):
        eps = config.layer_norm_epsilon
        self.ln_1 = nnx.LayerNorm(config.n_embd, epsilon=eps, rngs=rngs)
        self.attn = GPT2Attention(config, layer_idx, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(config.n_embd, epsilon=eps, rngs=rngs)
        self.mlp = GPT2MLP(config, rngs=rngs)

    def __call__(self, x_BTD, mask_B1TS, kv_cache=None, cache_index=None, dropout_rng=None):
        attn_rng, mlp_rng = _split(dropout_rng, 2)
        y_BTD, kv_cache = self.attn(self.ln_1(x_BTD), mask_B1TS, kv_cache, cache_index, attn_rng)
        x_BTD = x_BTD + y_BTD
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD), mlp_rng)
        return x_BTD, kv_cache


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 with its language-model head (tied to `wte` unless the config unties it)."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, embedding_init=_normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, embedding_init=_normal(0.01), rngs=rngs)
        self.h = nnx.List([GPT2Block(config, i, rngs=rngs) for i in range(config.n_layer)])
        self.ln_f = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.n_embd, config.vocab_size, use_bias=False, kernel_init=_normal(0.02), rngs=rngs)

    def __call__(
        self,
        input_ids_BT,
        *,
        attention_mask_BS=None,
        positions_BT=None,
        segment_ids_BT=None,
        cache=None,
        cache_index=None,
        dropout_rng=None,
        logit_positions_BK=None,
    ):
        """Logits [B, T, V]; with `cache` (see `init_cache`) also the updated cache.

        attention_mask_BS: 1 for real tokens, 0 for padding keys (Hugging Face's `attention_mask`); with a cache,
            one flag per cache slot, so left-padded rows (positions_BT counting real tokens only) ignore their pads.
        segment_ids_BT: packed sequences; attention stays within a segment (pass positions_BT too).
        cache, cache_index: keys/values of earlier tokens; this call's tokens are written at cache_index.
        logit_positions_BK: only these positions' logits [B, K, V]: the head is a third of GPT-2 small's compute,
            and training needs it only where the next token is a target.
        """
        B, T = input_ids_BT.shape
        offset = 0 if cache is None else cache_index
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T) + offset, (B, T))
        mask_B1TS = None
        if cache is not None or attention_mask_BS is not None or segment_ids_BT is not None:
            if cache is None:
                mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
            else:  # a cache is causal by slot: a query sees the slots up to its own, whatever positions_BT says
                S = cache["k"].shape[2]
                mask_BTS = jnp.broadcast_to(jnp.arange(S)[None, :] <= (jnp.arange(T) + offset)[:, None], (B, T, S))
            if attention_mask_BS is not None:
                mask_BTS &= attention_mask_BS.astype(bool)[:, None, :]
            if segment_ids_BT is not None:
                mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
            mask_B1TS = mask_BTS[:, None]
        embd_rng, *layer_rngs = _split(dropout_rng, 1 + len(self.h))
        # the tables are read as they are: nnx.Embed's call would cast bfloat16 tables back to its float32 dtype
        x_BTD = jnp.take(self.wte.embedding[...], input_ids_BT, axis=0) + jnp.take(self.wpe.embedding[...], positions_BT, axis=0)
        x_BTD = _rows_split(_dropout(x_BTD, self.config.embd_pdrop, embd_rng))
        remat = getattr(self, "remat", False) and cache is None
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache["k"], cache["v"], i)
            if remat:  # gradient checkpointing: keep each block's input, recompute its inside in the backward pass
                x_BTD, kv = checkpointed(block, x_BTD, (mask_B1TS, layer_rngs[i])), None
            else:
                x_BTD, kv = block(x_BTD, mask_B1TS, kv, cache_index, layer_rngs[i])
            x_BTD = _rows_split(x_BTD)
            if kv is not None:
                cache = {"k": kv[0], "v": kv[1]}
        x_BTD = self.ln_f(x_BTD)
        if logit_positions_BK is not None:
            x_BTD = jnp.take_along_axis(x_BTD, logit_positions_BK[:, :, None], axis=1)
        if hasattr(self, "lm_head"):
            logits_BTV = linear(self.lm_head, x_BTD)
        else:  # tied: the embedding table, transposed, is the head
            logits_BTV = matmul(x_BTD, self.wte.embedding[...].T)
        if cache is None:
            return logits_BTV
        return logits_BTV, cache


def check_model_and_tokenizer(model, tokenizer, call: str) -> None:
    """TypeError, naming the call, unless `model` is a GPT2LMHeadModel and `tokenizer` a tokenizer: the pair that
    jaxtune.load returns, in that order (given as one tuple, or swapped, they failed deep inside)."""
    if isinstance(model, GPT2LMHeadModel) and callable(getattr(tokenizer, "encode", None)):
        return
    hint = ("; jaxtune.load returns both: model, tokenizer = jaxtune.load(...)" if isinstance(model, tuple) else "")
    raise TypeError(f"give the model, then its tokenizer, as jaxtune.load returns them: {call}; got "
                    f"{type(model).__name__} and {type(tokenizer).__name__}{hint}")


def init_cache(config: GPT2Config, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty key/value cache for `length` positions: arrays [L, B, S, N, H]."""
    shape = (config.n_layer, batch, length, config.n_head, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def build(config: GPT2Config, *, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised model (GPT-2's initialisation)."""
    return GPT2LMHeadModel(config, rngs=nnx.Rngs(seed))


def abstract(config: GPT2Config) -> GPT2LMHeadModel:
    """The model's structure with shapes only, no memory: fill it from a checkpoint."""
    return nnx.eval_shape(lambda: GPT2LMHeadModel(config, rngs=nnx.Rngs(0)))


def num_params(model: GPT2LMHeadModel) -> int:
    """The base model's weights (adapters not counted), quantized kernels (QLoRA) counted at their float shape."""
    quantized = sum(math.prod(m.quant[1]) for _, m in nnx.iter_graph(model) if getattr(m, "quant", None))
    return quantized + sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
