"""QLoRA's frozen base: GPT-2's block projections held in 8 or 4 bits and dequantized inside each product.

- int8: symmetric, one float32 scale per output column (max |w| / 127): 8.0 bits per weight plus 32 per column.
- nf4: QLoRA's 4-bit NormalFloat, as bitsandbytes stores it: the weight cut into blocks of 64 consecutive values,
  each block divided by its largest magnitude (kept in float32) and every value rounded to the nearest of 16 levels
  placed at quantiles of a normal distribution; two codes per byte: 4.5 bits per weight.

Only the projections of the blocks (c_attn, c_proj, c_fc, mlp.c_proj: 85% of GPT-2 124M's weights, 96% of gpt2-xl's)
are quantized; embeddings, layer norms and biases stay as they are, as bitsandbytes leaves them.

`quantized_linear` has its own backward pass: it computes only the input's gradient, from the weight dequantized
again when the gradient arrives, so a step keeps no dequantized weight between its forward and backward passes.
Quantizing replaces a layer's `kernel` (nnx.Param) by `kernel_codes` and `kernel_scale` (QuantState); `dequantized`
gives the float model back for export (what PEFT's merge of a 4-bit base does too).
"""

from __future__ import annotations

from functools import lru_cache, partial
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.model import matmul, tied

KINDS = ("int8", "nf4")
NF4_BLOCK = 64


class QuantState(nnx.Variable):
    """A quantized kernel's codes or scales: frozen like the base, and not an nnx.Param, so the Hugging Face
    export never reads them as weights (`dequantized` turns them back into kernels first)."""


@lru_cache(maxsize=1)
def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels of the QLoRA paper: 8 positive and 7 negative quantiles of N(0, 1) taken between the
    offset 0.9677083 and 0.5, zero, all divided by the largest, so they span [-1, 1] with an exact 0."""
    ppf, offset = NormalDist().inv_cdf, 0.9677083
    positive = [ppf(offset + (0.5 - offset) * i / 8) for i in range(8)]
    negative = [-ppf(offset + (0.5 - offset) * i / 7) for i in range(7)]
    levels = np.array(sorted(positive + [0.0] + negative), np.float64)
    return (levels / np.abs(levels).max()).astype(np.float32)


def quantize_array(w, kind: str):
    """(codes, scales) of a [in, out] float kernel (traceable: `jax.eval_shape` plans it without the weights)."""
    w = jnp.asarray(w, jnp.float32)
    if kind == "int8":
        scale = jnp.abs(w).max(axis=0) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        return jnp.clip(jnp.rint(w / scale), -127, 127).astype(jnp.int8), scale
    if kind == "nf4":
        flat = w.reshape(-1)
        flat = jnp.pad(flat, (0, -flat.size % NF4_BLOCK)).reshape(-1, NF4_BLOCK)
        absmax = jnp.abs(flat).max(axis=1, keepdims=True)
        absmax = jnp.where(absmax > 0, absmax, 1.0)
        levels = nf4_levels()
        bounds = jnp.asarray((levels[1:] + levels[:-1]) / 2)  # nearest level: count the midpoints below each value
        codes = jnp.searchsorted(bounds, flat / absmax).astype(jnp.uint8).reshape(-1)
        return codes[0::2] << 4 | codes[1::2], absmax[:, 0]
    raise ValueError(f"quantize={kind!r}: choose one of {', '.join(KINDS)}")


def dequantize_array(codes, scale, kind: str, shape: tuple[int, int], dtype=jnp.float32):
    """The [in, out] kernel of (codes, scales), in `dtype` (computed in float32, then rounded)."""
    if kind == "int8":
        return (codes.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
    nibbles = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(-1, NF4_BLOCK)
    w = jnp.asarray(nf4_levels())[nibbles] * scale.astype(jnp.float32)[:, None]
    return w.reshape(-1)[: shape[0] * shape[1]].reshape(shape).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _quantized_product(x_BTK, codes, scale, kind, shape):
    # tied to this layer's input (forward) or gradient (backward), each dequantization stays local: left free,
    # XLA's CPU compiler merges the two and keeps every layer's dequantized weight alive between the passes
    return matmul(x_BTK, dequantize_array(tied(codes, x_BTK), scale, kind, shape, x_BTK.dtype))


def _quantized_product_fwd(x_BTK, codes, scale, kind, shape):
    return _quantized_product(x_BTK, codes, scale, kind, shape), (codes, scale)


def _quantized_product_bwd(kind, shape, residuals, g_BTN):
    """Only the input's gradient (the base is frozen), from the weight dequantized again once g arrives."""
    codes, scale = residuals
    dtype = g_BTN.dtype  # the product's output dtype: the input's
    w_KN = dequantize_array(tied(codes, g_BTN), scale, kind, shape, dtype)
    dx_BTK = jnp.einsum("...n,kn->...k", g_BTN, w_KN, preferred_element_type=jnp.float32).astype(dtype)
    return dx_BTK, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(scale)


_quantized_product.defvjp(_quantized_product_fwd, _quantized_product_bwd)


def quantized_linear(layer, x_BTK):
    """x @ dequantize(kernel) (+ bias) for a quantized layer."""
    kind, shape = layer.quant
    y = _quantized_product(x_BTK, layer.kernel_codes[...], layer.kernel_scale[...], kind, shape)
    return y if layer.bias is None else y + layer.bias[...].astype(y.dtype)


def _projections(model):
    for block in model.h:
        for parent in (block.attn, block.mlp):
            for name in ("c_attn", "c_proj", "c_fc"):
                layer = getattr(parent, name, None)
                if layer is not None:
                    yield layer


def is_quantized(model) -> bool:
    return any(getattr(layer, "quant", None) for layer in _projections(model))


def quantize_base(model, kind: str):
    """Hold every block projection of `model` in `kind` (in place; adapters are untouched); returns the model."""
    if kind not in KINDS:
        raise ValueError(f"quantize={kind!r}: choose one of {', '.join(KINDS)}")
    for layer in _projections(model):
        if getattr(layer, "quant", None):
            continue
        kernel = layer.kernel.get_value()
        if isinstance(kernel, jax.ShapeDtypeStruct):  # an abstract model (memory plans): shapes only
            codes, scale = jax.eval_shape(partial(quantize_array, kind=kind), kernel)
        else:
            codes, scale = jax.jit(quantize_array, static_argnums=1)(kernel, kind)
        layer.quant = (kind, tuple(kernel.shape))  # static: part of the graph definition
        layer.kernel_codes, layer.kernel_scale = QuantState(codes), QuantState(scale)
        del layer.kernel
    return model


def dequantized(model):
    """A copy of `model` whose quantized projections hold float32 kernels again (the values the step computed with)."""
    out = nnx.clone(model)
    for layer in _projections(out):
        if getattr(layer, "quant", None):
            kind, shape = layer.quant
            layer.kernel = nnx.Param(dequantize_array(layer.kernel_codes[...], layer.kernel_scale[...], kind, shape))
            del layer.kernel_codes, layer.kernel_scale, layer.quant
    return out


def quantized_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, QuantState)))
