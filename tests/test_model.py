"""The Flax GPT-2 against PyTorch transformers with the same weights, across the config options GPT-2s use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune.checkpoint import load
from jaxtune.config import ConfigError, GPT2Config
from jaxtune.model import attention, attention_implementation, build

from conftest import make_hf_model, torch_logits

IDS = np.array([[6310, 2762, 25, 23998, 34313, 198, 31077, 25, 3226, 1781, 11],
                [464, 2756, 318, 720, 2079, 13, 50256, 50256, 50256, 50256, 50256]], np.int32)


@pytest.mark.parametrize("overrides", [
    {},
    {"activation_function": "relu", "layer_norm_epsilon": 1e-6},
    {"activation_function": "gelu", "n_inner": 96},
    {"scale_attn_by_inverse_layer_idx": True, "n_layer": 3},
    {"tie_word_embeddings": False},
], ids=["gpt2", "relu-eps", "gelu-n_inner", "inverse-layer-scale", "untied-head"])
def test_logits_match_pytorch(tmp_path, overrides):
    pt = make_hf_model(tmp_path, seed=1, **overrides)
    model, _ = load(str(tmp_path))
    ours = np.asarray(model(jnp.asarray(IDS)))
    assert ours.shape == (2, IDS.shape[1], 50257)
    assert np.abs(ours - torch_logits(pt, IDS)).max() < 1e-4


def test_padding_mask_matches_pytorch(hf_dir, torch_model):
    """With Hugging Face's attention_mask, padded positions' logits match too (the reference's loss uses them)."""
    model, _ = load(str(hf_dir))
    mask = (np.arange(IDS.shape[1]) < np.array([[11], [6]])).astype(np.int32)
    ours = np.asarray(model(jnp.asarray(IDS), attention_mask_BS=jnp.asarray(mask)))
    assert np.abs(ours - torch_logits(torch_model, IDS, mask)).max() < 1e-4


def test_causal():
    """Changing a later token never changes an earlier position's logits."""
    model = build(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2), seed=0)
    ids = np.random.default_rng(0).integers(0, 100, (1, 12)).astype(np.int32)
    base = np.asarray(model(jnp.asarray(ids)))
    for t in range(12):
        changed = ids.copy()
        changed[0, t] = (changed[0, t] + 1) % 100
        out = np.asarray(model(jnp.asarray(changed)))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert np.abs(out[0, t:] - base[0, t:]).max() > 0


def test_segments_isolate_packed_examples():
    """Two examples packed into one row, positions restarting, give each example's own logits."""
    model = build(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2), seed=0)
    a, b = np.array([[5, 6, 7, 8]]), np.array([[9, 10, 11]])
    packed = np.concatenate([a, b], axis=1)
    forward = nnx.jit(lambda m, ids, **kw: m(ids, **kw))  # compiled: op by op it took 15 s
    out = np.asarray(forward(model, jnp.asarray(packed), segment_ids_BT=jnp.asarray([[1, 1, 1, 1, 2, 2, 2]]),
                             positions_BT=jnp.asarray([[0, 1, 2, 3, 0, 1, 2]])))
    np.testing.assert_allclose(out[:, :4], np.asarray(forward(model, jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(out[:, 4:], np.asarray(forward(model, jnp.asarray(b))), atol=1e-5)


@pytest.mark.parametrize("hf, words", [
    ({"activation_function": "mish"}, "activation_function='mish'"),
    ({"add_cross_attention": True}, "add_cross_attention"),
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"n_embd": 10, "n_head": 3}, "not divisible"),
])
def test_unsupported_config_is_named(hf, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        GPT2Config.from_hf({"model_type": "gpt2", **hf})


def test_fused_attention_is_asked_for_on_gpus_and_falls_back_where_it_cannot_run():
    """jax.nn.dot_product_attention uses XLA's kernel unless told otherwise, so the model asks for cuDNN's on a GPU
    in bfloat16 (and the compiled program must then hold cuDNN's fused call). Where that kernel cannot run (here: no
    cuDNN on a CPU), the XLA result comes back instead. Either way the bf16 result is held to float32 attention on the
    same inputs: within 2 bf16 ulps of the output's magnitude (bf16 keeps 8 significant bits). The two bf16 kernels
    are not held to each other: each rounds differently, and on an H200 they were 1e-2 apart at magnitude 3.5."""
    import jax

    assert attention_implementation(jnp.float32) is None
    on_gpu = jax.default_backend() == "gpu"
    assert attention_implementation(jnp.bfloat16) == ("cudnn" if on_gpu else None)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 64)), jnp.bfloat16) for _ in range(3))
    segments = jnp.asarray(np.repeat([[1, 2]], 8, axis=1).repeat(2, axis=0))
    mask = (jnp.tril(jnp.ones((16, 16), bool))[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]
    for m in (None, mask):
        with jax.default_matmul_precision("highest"):
            exact = np.asarray(attention(*(x.astype(jnp.float32) for x in (q, k, v)), m, 0.125, implementation=None))
        tolerance = 2 * 2.0**-8 * np.abs(exact).max()
        asked = jax.jit(lambda q, k, v: attention(q, k, v, m, 0.125, implementation="cudnn"))
        if on_gpu:
            assert "cudnn" in asked.lower(q, k, v).compile().as_text(), "cuDNN's fused attention did not run"
        for result in (asked(q, k, v), attention(q, k, v, m, 0.125, implementation=None)):
            np.testing.assert_allclose(np.asarray(result, np.float32), exact, atol=tolerance)


def test_dropout_keeps_the_asked_share_and_scales_to_the_same_mean():
    """Two mask elements share a 32-bit random word: each element still keeps with probability 1 - rate (to
    1/65536), the two halves of a word are independent, and the kept values are scaled so the mean is unchanged."""
    from jaxtune.model import _dropout, keep_mask

    for rate in (0.1, 0.5, 0.003):
        mask, kept = keep_mask(jax.random.key(3), rate, (32, 64, 129))  # an odd last axis: one half word unused
        mask = np.asarray(mask)
        assert mask.shape == (32, 64, 129) and abs(kept - (1 - rate)) < 1 / 65536
        assert abs(mask.mean() - kept) < 4 * np.sqrt(kept * (1 - kept) / mask.size)
        even, odd = mask[..., 0:128:2].ravel(), mask[..., 1:129:2].ravel()
        assert abs(np.corrcoef(even, odd)[0, 1]) < 0.02
    x = jnp.ones((512, 1024))
    assert float(_dropout(x, 0.25, jax.random.key(0)).mean()) == pytest.approx(1.0, abs=0.005)
    assert not np.array_equal(np.asarray(keep_mask(jax.random.key(0), 0.1, (8, 64))[0]),
                              np.asarray(keep_mask(jax.random.key(1), 0.1, (8, 64))[0]))
