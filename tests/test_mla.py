"""DeepSeek-V3's MLA against its formulas, its absorbed one-token step, and YaRN."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax.model import rotary
from minids_jax.model.mla import LATENT_NORM_EPS, MLA
from tests.factories import compute_config, small_model_config

YARN = dict(rope_yarn_factor=4.0, rope_original_max_len=8, rope_mscale=1.0,
            rope_mscale_all_dim=1.0)


def _inputs(cfg, length=None, seed=0):
    length = length or cfg.max_seq_len
    x = jax.random.normal(jax.random.key(seed), (2, length, cfg.d_model))
    return x, jnp.broadcast_to(jnp.arange(length), (2, length))


def naive_mla(layer: MLA, cfg, x, positions) -> np.ndarray:
    """The formulas of DeepSeek-V3's MLA in float64 numpy, from the layer's weights (RoPE from
    its own frequencies: interleaved pairs in, halves out)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    heads, dn, dr, dv, rank = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                               cfg.v_head_dim, cfg.kv_lora_rank)
    x = f64(x)

    def rms(a, scale):
        return a / np.sqrt(np.mean(a ** 2, -1, keepdims=True) + LATENT_NORM_EPS) * f64(scale)

    def rope(a):  # a [B, L, H, dr]
        inv_freq = rotary.yarn_inv_freq(dr, cfg.rope_theta, cfg.rope_yarn_factor,
                                        cfg.rope_original_max_len, cfg.rope_beta_fast,
                                        cfg.rope_beta_slow)
        angle = f64(positions)[:, :, None, None] * inv_freq
        even, odd = a[..., 0::2], a[..., 1::2]
        amplitude = layer.rope.amplitude
        return amplitude * np.concatenate([even * np.cos(angle) - odd * np.sin(angle),
                                           even * np.sin(angle) + odd * np.cos(angle)], -1)

    if cfg.q_lora_rank:
        q = rms(x @ f64(layer.q_down.kernel[...]), layer.q_norm.scale[...]) @ f64(
            layer.q_up.kernel[...])
    else:
        q = x @ f64(layer.q.kernel[...])
    q = q.reshape(*x.shape[:2], heads, dn + dr)
    q_nope, q_rope = q[..., :dn], rope(q[..., dn:])
    kv = x @ f64(layer.kv_down.kernel[...])
    latent, k_rope = rms(kv[..., :rank], layer.kv_norm.scale[...]), rope(kv[..., None, rank:])
    kv_up = (latent @ f64(layer.kv_up.kernel[...])).reshape(*x.shape[:2], heads, dn + dv)
    k = np.concatenate([kv_up[..., :dn], np.broadcast_to(k_rope, (*x.shape[:2], heads, dr))], -1)
    v = kv_up[..., dn:]
    scale = (dn + dr) ** -0.5 * rotary.softmax_mscale(cfg)
    scores = np.einsum("bqhd,bkhd->bhqk", np.concatenate([q_nope, q_rope], -1), k) * scale
    length = x.shape[1]
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], heads * dv)
    return out @ f64(layer.out.kernel[...])


@pytest.mark.parametrize("overrides", [dict(q_lora_rank=0), dict(q_lora_rank=8),
                                       dict(q_lora_rank=8, **YARN)],
                         ids=["direct query", "low-rank query", "low-rank query, YaRN"])
@pytest.mark.parametrize("kernel", ["fused", "dot_product_attention"])
def test_mla_equals_its_formulas_in_float64(overrides, kernel):
    cfg = small_model_config(attn_pattern=("mla",), **overrides)
    layer = MLA(cfg, compute_config(attention_kernel=kernel), rngs=nnx.Rngs(0))
    x, positions = _inputs(cfg)
    np.testing.assert_allclose(layer(x, positions)[0], naive_mla(layer, cfg, x, positions),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(), YARN])
def test_absorbed_one_token_steps_equal_the_full_forward(overrides):
    """Token by token from an empty cache: every position's output equals the uncached one,
    and the cache holds only R + Dr numbers per token."""
    cfg = small_model_config(attn_pattern=("mla",), q_lora_rank=8, **overrides)
    layer = MLA(cfg, compute_config(), rngs=nnx.Rngs(1))
    x, positions = _inputs(cfg)
    full = layer(x, positions)[0]
    cache = layer.init_cache(2, cfg.max_seq_len, jnp.float32)
    cached_numbers = sum(a.size for a in cache[:2]) / (2 * cfg.max_seq_len)
    assert cached_numbers == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    step = jax.jit(lambda x, p, c: layer(x, p, c))
    outs = []
    for t in range(cfg.max_seq_len):
        out, cache = step(x[:, t:t + 1], positions[:, t:t + 1], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    # A prompt, then one token (the expanded form, then the absorbed one).
    cache = layer.init_cache(2, cfg.max_seq_len, jnp.float32)
    prompt_out, cache = layer(x[:, :9], positions[:, :9], cache)
    next_out, _ = layer(x[:, 9:10], positions[:, 9:10], cache)
    np.testing.assert_allclose(prompt_out, full[:, :9], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(next_out, full[:, 9:10], rtol=1e-4, atol=1e-5)


def test_yarn_frequencies_follow_the_reference_formulas():
    """DeepSeek-V3's RoPE (dr 64, theta 1e4, 4096 original positions, factor 40, beta 32/1):
    dims up to 10 keep their frequency, dims from 23 on are divided by 40, and between them
    the ramp is linear (reference: HF _compute_yarn_parameters)."""
    dim, theta, factor, original = 64, 10000.0, 40.0, 4096
    inv_freq = rotary.yarn_inv_freq(dim, theta, factor, original, 32.0, 1.0)
    base = theta ** (-np.arange(0, dim, 2) / dim)

    def correction(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(correction(32.0)), math.ceil(correction(1.0))
    assert (low, high) == (10, 23)
    np.testing.assert_allclose(inv_freq[:low + 1], base[:low + 1], rtol=1e-12)
    np.testing.assert_allclose(inv_freq[high:], base[high:] / factor, rtol=1e-12)
    j = np.arange(low, high + 1)
    ramp = (j - low) / (high - low)
    np.testing.assert_allclose(inv_freq[j], base[j] / factor * ramp + base[j] * (1 - ramp),
                               rtol=1e-12)
    np.testing.assert_allclose(rotary.yarn_inv_freq(dim, theta, 1.0, original, 32.0, 1.0),
                               base, rtol=1e-12)


def test_yarn_softmax_scale_and_amplitude_of_deepseek_v3():
    cfg = small_model_config(attn_pattern=("mla",), qk_nope_head_dim=128, qk_rope_head_dim=64,
                             rope_yarn_factor=40.0, rope_mscale=1.0, rope_mscale_all_dim=1.0)
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * rotary.softmax_mscale(cfg)
    assert scale == pytest.approx(0.13523378, rel=1e-7)  # the reference's number for V3
    assert rotary.Rope.of(cfg, 64).amplitude == 1.0
    # Without mscale_all_dim (LLaMA-style YaRN) the amplitude carries 0.1 ln f + 1 instead.
    llama = small_model_config(rope_yarn_factor=40.0, rope_mscale_all_dim=0.0)
    assert rotary.softmax_mscale(llama) == 1.0
    assert rotary.Rope.of(llama, 8).amplitude == pytest.approx(0.1 * math.log(40) + 1)
