import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax.model.attention import MHA
from minids_jax.model.mhla import MHLA
from minids_jax.model.mla import MLA
from tests.factories import compute_config, small_model_config


def _inputs(cfg, length=None, seed=0):
    length = length or cfg.max_seq_len
    x = jax.random.normal(jax.random.key(seed), (2, length, cfg.d_model))
    return x, jnp.broadcast_to(jnp.arange(length), (2, length))


def test_mha_equals_naive_softmax_attention(model_cfg):
    mha = MHA(model_cfg, compute_config(), rngs=nnx.Rngs(0))
    x, positions = _inputs(model_cfg)
    proj, dh = mha.attention, model_cfg.head_dim
    q = proj.rope(proj.heads(proj.q(x)), positions)
    k = proj.rope(proj.heads(proj.k(x)), positions)
    v = proj.heads(proj.v(x))
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    length = x.shape[1]
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
    expected = out @ np.asarray(proj.out.kernel[...], np.float64)
    np.testing.assert_allclose(mha(x, positions)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [MHA, MHLA, MLA])
def test_attention_is_causal(cls):
    cfg = small_model_config()
    layer = cls(cfg, compute_config(), rngs=nnx.Rngs(0))
    x, positions = _inputs(cfg)
    t = 6
    x_changed = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(9), x[:, t + 1:].shape))
    out, out_changed = layer(x, positions)[0], layer(x_changed, positions)[0]
    np.testing.assert_allclose(out[:, :t + 1], out_changed[:, :t + 1], atol=1e-6)
    assert not np.allclose(out[:, t + 1:], out_changed[:, t + 1:], atol=1e-4)
    # Truncating the input after t changes nothing at <= t either.
    out_truncated = layer(x[:, :t + 1], positions[:, :t + 1])[0]
    np.testing.assert_allclose(out[:, :t + 1], out_truncated, atol=1e-5)


def test_mhla_is_finite_and_silent_before_the_first_segment_end():
    cfg = small_model_config()  # 16 positions, 4 latents: the first segment ends at 4
    mhla = MHLA(cfg, compute_config(), rngs=nnx.Rngs(0))
    x, positions = _inputs(cfg)
    out, _ = mhla(x, positions)
    assert np.all(np.isfinite(out))
    # Positions 0..2 see no completed latent: exactly zero update, not a uniform average.
    np.testing.assert_array_equal(out[:, :3], 0.0)
    assert np.all(np.abs(out[:, 3]) > 0)
    grads = jax.grad(lambda x: jnp.sum(mhla(x, positions)[0]))(x)
    assert np.all(np.isfinite(grads))


def test_mhla_latents_summarize_their_segments():
    """Position 7 (end of segment 2) must depend on token 5, but position 6 must not."""
    cfg = small_model_config(attn_pattern=("mhla",))
    mhla = MHLA(cfg, compute_config(), rngs=nnx.Rngs(0))
    x, positions = _inputs(cfg)
    jac = jax.jacobian(lambda x5: mhla(x.at[0, 5].set(x5), positions)[0][0])(x[0, 5])
    influence = np.abs(np.asarray(jac)).sum(axis=(1, 2))  # per output position
    assert influence[7] > 0
    np.testing.assert_array_equal(influence[:7], 0.0)


@pytest.mark.parametrize("cls", [MHA, MHLA, MLA])
def test_attention_kernels_agree(cls):
    """The CPU kernel (kernels/attention.py) and jax.nn.dot_product_attention: same outputs
    and gradients."""
    x, positions = _inputs(small_model_config(), length=13)  # not a whole number of blocks

    def run(kernel):
        layer = cls(small_model_config(), compute_config(attention_kernel=kernel),
                    rngs=nnx.Rngs(0))
        return jax.value_and_grad(lambda x: jnp.sum(jnp.sin(layer(x, positions)[0])))(x)

    (fused_value, fused_grad), (dpa_value, dpa_grad) = run("fused"), run("dot_product_attention")
    np.testing.assert_allclose(fused_value, dpa_value, rtol=1e-5)
    np.testing.assert_allclose(fused_grad, dpa_grad, atol=1e-5)


def test_cudnn_attention_that_cannot_run_falls_back_to_xla_with_a_warning(caplog):
    from minids_jax.model.attention import multi_head_attention

    q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 5, 2, 8))
    with caplog.at_level("WARNING"):  # no cuDNN on a CPU
        attended = multi_head_attention(q, k, v, kernel="cudnn", is_causal=True)
    assert "XLA's attention instead" in caplog.text
    np.testing.assert_array_equal(attended, multi_head_attention(
        q, k, v, kernel="dot_product_attention", is_causal=True))
